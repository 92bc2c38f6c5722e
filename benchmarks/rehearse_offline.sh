#!/usr/bin/env bash
# Rehearse the air-gapped GPU machine on this one: a folder of wheels made while connected, then a
# venv built from that folder alone (--no-index), unison installed into it from a wheel (not
# editable), and what the first GPU call runs: the GPU suite's smoke run and the collection of the
# `gpu`-marked tests. Not part of CI (it downloads torch and its CUDA libraries: about 4 GB, a few
# minutes); run it before a session that will use a lent GPU.
#
#   bash benchmarks/rehearse_offline.sh [WORK_DIR]
#
# Versions (the GPU machine's by default): TORCH=2.11.0 TRANSFORMERS=5.17.0; PYTHON names the
# interpreter (the GPU machine's is 3.12; a pyenv one: PYTHON=~/.pyenv/versions/3.12.1/bin/python3.12).
# WORK_DIR/wheels/ (everything but what torch and transformers bring) is the folder that travels to
# a machine that has both, as the GPU machine does; its wheels are for PYTHON's version and this
# platform, and its size is printed at the end (it must stay under 64 MiB with everything else).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d -t unison-rehearsal-XXXX)}
torch_version=${TORCH:-2.11.0}
transformers_version=${TRANSFORMERS:-5.17.0}
python=${PYTHON:-python3}  # the GPU machine has 3.12
export MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo TOKENIZERS_PARALLELISM=false
mkdir -p "$work/wheels" "$work/base"
echo "rehearsal in $work (torch $torch_version, transformers $transformers_version)"

# 1. Connected: unison's wheel, its dependencies (no imageio-ffmpeg: optional, 68 MB), and
#    separately the packages the GPU machine already has (torch, transformers and theirs).
"$python" -m pip wheel -q --no-deps -w "$work/wheels" "$repo"
"$python" -m pip download -q -d "$work/base" "torch==$torch_version" "transformers==$transformers_version"
"$python" -c "import tomllib; deps = tomllib.load(open('$repo/pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('imageio-ffmpeg', 'torch', 'transformers'))))" \
    > "$work/requirements.txt"
"$python" -m pip download -q -d "$work/wheels" -r "$work/requirements.txt" pytest \
    "torch==$torch_version" "transformers==$transformers_version"
# What the base machine has need not travel: drop from wheels/ whatever base/ holds.
for f in "$work"/base/*.whl; do rm -f "$work/wheels/$(basename "$f")"; done

# 2. Offline: nothing but the two folders.
rm -rf "$work/venv"
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/pip" install -q --no-index --find-links "$work/base" --find-links "$work/wheels")
"${pip[@]}" "torch==$torch_version" "transformers==$transformers_version"
"${pip[@]}" -r "$work/requirements.txt" pytest
"${pip[@]}" --no-deps unison-video
cd "$work"  # not the checkout: the installed package must stand alone
"$work/venv/bin/python" -c "import torch, transformers, unison, unison.launch.cli as c; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'unison at', unison.__file__, \
'recipes at', c.configs_dir())"

# 3. What the first GPU call runs, here on the CPU.
"$work/venv/bin/python" "$repo/benchmarks/gpu_suite.py" --smoke --out "$work/results"
(cd "$repo" && "$work/venv/bin/python" -m pytest -q -m gpu --collect-only -p no:cacheprovider | tail -1)
"$work/venv/bin/unison" --set output.decode=false --save-latents "$work/latents.pt" --steps 2

# Without imageio-ffmpeg an mp4 is refused before loading, in one line (exit 2).
set +e
"$work/venv/bin/unison" --dry-run 2> "$work/without-ffmpeg.txt"
code=$?
set -e
[ "$code" = 2 ] && grep -q "needs the 'imageio-ffmpeg' package" "$work/without-ffmpeg.txt"
echo "without imageio-ffmpeg (exit $code): $(cat "$work/without-ffmpeg.txt")"
echo "wheels that travel: $(du -sh "$work/wheels" | cut -f1) in $(ls "$work/wheels" | wc -l) files"
