# Everything goes through a local virtual environment that the Makefile builds itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The project needs torch>=2.4; this pin is the build that installs from this machine's disk.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SMOKE  ?= build/smoke
BUDGET ?= 15
SEEDS  ?= 2
OUT    ?= bench-results/quality
VIT_OUT ?= bench-results/quality-vit
FT_BUDGET ?= 15
OUT_FT ?= bench-results/finetune
# The ViT row: ViT-Tiny/8 on 32 px images with AdamW (MoCo v3's ViT optimiser); see README, "The ViT recipe".
VIT_ARGS ?= -a vit_tiny --patch-size 8 --optimizer adamw --lr 5e-4 --wd 0.1 --moco-t 0.2 --moco-m 0.8 \
	--moco-mlp-dim 1024 --crop-min 0.2

.PHONY: venv lint test test-e2e test-fast smoke-test bench-speed bench-quality bench-quality-vit bench-finetune bench-bf \
	bench-downstream bench-continue bench-recipe bench-multicrop bench-data-index bench-embed bench-longtail clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

lint: venv
	$(BIN)/ruff check .

# Two pytest workers, one thread each. The end-to-end runs (make smoke-test, the benchmark scripts at
# toy size, bench/gpu.sh --tiny on the CPU) are their own target: minutes each, and run one at a time since
# benchmarks time themselves.
test: venv lint
	$(BIN)/python -m pytest -q -n 2 -m "not e2e"

test-e2e: venv
	$(BIN)/python -m pytest -q -m e2e

test-fast: venv
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

# Whole pipeline on a generated JPEG ImageFolder, on the CPU: pretrain a ResNet-18 and a ViT-Tiny with
# BatchFormer, then kNN-probe each; then pretrain on an unlabelled folder nested by date (docs/data.md).
smoke-test: venv
	rm -rf $(SMOKE)
	$(BIN)/python -m bfcl.synthetic $(SMOKE)/data --classes 4 --train-per-class 96 --val-per-class 32 --size 32
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml train.py --mixed-precision auto \
		--data $(SMOKE)/data --output-dir $(SMOKE)/run -a resnet18 --stem imagenet --image-size 32 \
		-b 32 --epochs 4 --warmup-epochs 1 --lr 0.6 --moco-mlp-dim 512 --add_bf 1 --workers 2 \
		--log-every 4 --knn-every 12 --knn-samples 128
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml probe.py \
		--pretrained $(SMOKE)/run/backbone.safetensors --data $(SMOKE)/data --mode knn --workers 2 \
		--output-dir $(SMOKE)/probe
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml train.py --mixed-precision auto \
		--data $(SMOKE)/data --output-dir $(SMOKE)/run-vit -a vit_tiny --patch-size 8 --image-size 32 \
		-b 32 --epochs 2 --warmup-epochs 1 --moco-mlp-dim 256 --add_bf 1 --workers 2 --log-every 4
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml probe.py \
		--pretrained $(SMOKE)/run-vit/backbone.safetensors --data $(SMOKE)/data --mode knn --workers 2 \
		--output-dir $(SMOKE)/probe-vit
	$(BIN)/python -m bfcl.synthetic $(SMOKE)/photos --unlabelled --classes 4 --train-per-class 64 --size 32
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml train.py --mixed-precision auto \
		--data $(SMOKE)/photos --output-dir $(SMOKE)/run-photos -a resnet18 --image-size 32 \
		-b 32 --epochs 2 --warmup-epochs 1 --moco-mlp-dim 256 --workers 2 --log-every 4 \
		--knn-every 8 --knn-data $(SMOKE)/data --knn-samples 128

bench-speed: venv
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/speed.py --arch vit_tiny --only trainer,bf

bench-quality: venv
	$(BIN)/python bench/quality.py --budget-min $(BUDGET) --seeds $(SEEDS) --out $(OUT)

bench-quality-vit: venv
	$(BIN)/python bench/quality.py --budget-min $(BUDGET) --seeds $(SEEDS) --no-equal-steps --out $(VIT_OUT) \
		--train-args "$(VIT_ARGS)"

# Fine-tuning from a 15-minute bfcl backbone vs from random init, FT_BUDGET minutes each (bench/finetune_bench.py).
bench-finetune: venv
	$(BIN)/python bench/finetune_bench.py --pretrain-min $(BUDGET) --budget-min $(FT_BUDGET) --seeds $(SEEDS) --out $(OUT_FT)

# Few labels: the 15-minute backbone vs random init at 1, 10 and 100 % of the CIFAR-10 labels (kNN, fast-linear,
# fine-tuning with each start's recipe, + BatchFormer in the classifier at 1 and 10 %), 2 seeds; about 1 h 45 min
# on 2 cores (bench/downstream.py). DS_ARGS="--pretrained RUN/backbone.safetensors" skips the pretraining.
OUT_DS ?= bench-results/downstream
DS_ARGS ?=
bench-downstream: venv
	$(BIN)/python bench/downstream.py --pretrain-min $(BUDGET) --seeds $(SEEDS) --out $(OUT_DS) $(DS_ARGS)

# Continued pretraining (issue 34): CIFAR-10 split by class; on the target half, random init vs --init-from the
# source backbone vs the source as it is, BUDGET minutes of steps each, kNN + fine-tuning at 10 % of the target
# labels, 2 seeds; about 1 h 50 min on 2 cores (bench/continued_pretraining.py).
OUT_CONT ?= bench-results/continue
bench-continue: venv
	$(BIN)/python bench/continued_pretraining.py --budget-min $(BUDGET) --seeds $(SEEDS) --out $(OUT_CONT)

# Which changes to the small-image recipe learn more per step? Each variant one epoch (195 steps) against the
# recipe, 1 seed: about 15 min a run on 2 AVX2 cores (bench/recipe_screen.py). Confirm a winner at the target
# length: RECIPE_ARGS="--steps 1161 --seeds 2 --variants NAME".
RECIPE_OUT ?= bench-results/recipe-screen
RECIPE_ARGS ?=
bench-recipe: venv
	$(BIN)/python bench/recipe_screen.py --out $(RECIPE_OUT) $(RECIPE_ARGS)

# When does BatchFormer help? Screen every variant (5 min, 2 seeds), confirm the best two and the released
# default (15 min, 3 seeds, equal wall-clock and equal steps), then the best against MoCo v3 at 45 min
# (bench/bf_study.py). Hours on 2 cores.
BF_OUT ?= bench-results/bf
bench-bf: venv
	$(BIN)/python bench/bf_study.py --budget-min 5 --seeds 2 --out $(BF_OUT)/screen
	$(BIN)/python bench/bf_study.py --budget-min 15 --seeds 3 --equal-steps --out $(BF_OUT)/confirm \
		--variants released,best:2:$(BF_OUT)/screen/results.json
	$(BIN)/python bench/bf_study.py --budget-min 45 --seeds 1 --out $(BF_OUT)/trend \
		--variants best:1:$(BF_OUT)/confirm/results.json

# Multi-crop (issue 37, docs/multicrop.md): local crops, more global views and BatchFormer over several views
# against MoCo v3's two views at equal wall-clock and at equal steps (bench/multicrop.py): 10 runs of BUDGET minutes
# per seed, the arms again at MoCo v3's step count, calibration: up to ~10 h on 2 cores at the defaults;
# MULTICROP_ARGS="--variants local-2,local-6" for fewer arms.
MULTICROP_OUT ?= bench-results/multicrop
MULTICROP_ARGS ?=
bench-multicrop: venv
	$(BIN)/python bench/multicrop.py --budget-min $(BUDGET) --seeds $(SEEDS) --equal-steps --out $(MULTICROP_OUT) \
		$(MULTICROP_ARGS)

# The image index at 100 k and 1.28 M empty files, ImageNet-shaped and photo-dump-shaped: index time, size,
# memory of 8 loader workers (bench/data_index.py; docs/data.md). Writes and deletes ~2.8 M files in /tmp.
bench-data-index: venv
	$(BIN)/python bench/data_index.py

# Embeddings (issue 35, bench/embed_bench.py; docs/embed.md): --neighbours 10 over 10 k, 50 k and 100 k random rows
# (time, peak memory), the embed pass against the bare forward on 50 k CIFAR-10 images, retrieval on CIFAR-10 val
# and planted near-duplicates over a sweep of T. Random init only unless EMBED_ARGS="--pretrained RUN/backbone.safetensors"
# (e.g. a 15-minute make bench-quality backbone); sized for about 1 h on 2 cores (not timed end to end yet).
OUT_EMBED ?= bench-results/embed
EMBED_ARGS ?=
bench-embed: venv
	$(BIN)/python bench/embed_bench.py --out $(OUT_EMBED) $(EMBED_ARGS)

# Long tails (issue 36, bench/longtail.py; docs/longtail.md): CIFAR-10-LT at R 100 (12,406 images). Pretraining on
# them, MoCo v3 / --add_bf 1 / after-warmup, 600 steps each, 2 seeds, kNN by many/medium/few; fine-tuning from MoCo
# v3, --add_bf 1 and random init with CE and Balanced Softmax, each with and without --bf-head, 2 seeds (3 where
# the paired std is above 0.5), 2.5 min each; about 1 h 55 min on 2 cores (not run end to end yet).
OUT_LT ?= bench-results/longtail
LT_ARGS ?=
bench-longtail: venv
	$(BIN)/python bench/longtail.py --seeds $(SEEDS) --out $(OUT_LT) $(LT_ARGS)

clean:
	rm -rf build bench-results .pytest_cache
