#!/usr/bin/env bash
# The device side on a CUDA GPU, in one short call of a lent GPU machine: the CUDA tests (tests/test_cuda.py), then
# the bench with `--device cuda` on a random-weight model of the bundled model's shapes (scripts/random_weights.py).
#
#   scripts/cuda_check.sh OUT_DIR MODEL_DIR
#
# MODEL_DIR holds the model's config.json and tokenizer files (a copy of the bundled model's cache directory
# without its weights, ~3.5 MB); its model.safetensors is written here. The machine's python3 needs this project's
# dependencies. Writes setup.txt, pytest.txt, bench.md and bench.json to OUT_DIR. DEVICE=cpu runs the same
# steps without a GPU (the tests then skip), to try the script out.
#
# Made ready on this machine, in ignored folders that the call carries:
#   cache=$(.venv/bin/python -c "from secureinfer.model import load_checkpoint; print(load_checkpoint().details['cache_dir'])")
#   mkdir -p .gpu/smollm2-shape && cp "$cache"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2-shape/
#   wheels, for that machine's Python and platform, of what its image lacks (gguf, cryptography, cffi, pycparser,
#   orjson, platformdirs) in .whl/, installed there with `pip install --no-index --target` before this script.
set -uo pipefail
out=${1:?usage: scripts/cuda_check.sh OUT_DIR MODEL_DIR}
model=${2:?usage: scripts/cuda_check.sh OUT_DIR MODEL_DIR}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    lscpu | grep -E "^Model name|^CPU\(s\)"
    grep -o -w -E "avx512_vnni|amx_int8" /proc/cpuinfo | sort | uniq -c
    $python -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
    # the kernels build (~25 s each) while the weights are drawn
    for source in src/secureinfer/crypto/*.cpp; do
        $python -c "import sys; from secureinfer.crypto.native import build; print(sys.argv[1], build(sys.argv[1])[1])" "$(basename "$source")" &
    done
    $python scripts/random_weights.py "$model"
    wait
} > "$out/setup.txt" 2>&1

timeout "${TEST_TIMEOUT_S:-240}" $python -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$out/pytest.txt" 2>&1
echo "pytest exit code $?" >> "$out/pytest.txt"

# plain and the two T2 schemes beside transformers on the same device, our engine and `enclave` on the CPU
timeout "${BENCH_TIMEOUT_S:-240}" $python -m secureinfer bench --model "$model" --device "$device" --quiet \
    --scheme plain --scheme enclave --scheme secureinfer --scheme hardened --scheme kvshield \
    --repeats "${REPEATS:-3}" --max-new-tokens "${NEW_TOKENS:-32}" --out "$out/bench.json" > "$out/bench.md" 2>&1
echo "bench exit code $?" >> "$out/bench.md"
