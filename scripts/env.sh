# Sourced by the repository's scripts (demo, tests, bench): the environment they run tunelab in.
# The shared data folder beside the checkout, unless the caller points elsewhere; offline Hub; the venv.
if [ -z "${TUNELAB_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export TUNELAB_DATA_DIR=$(cd ../shared/data && pwd); fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
PY=${PY:-.venv/bin/python}
