#!/usr/bin/env bash
# fastmerge and mergekit side by side on the same files (issue 6): linear (2 models), TIES and DARE
# (3 fine-tunes + base) of the LLaMA-like bfloat16 checkpoints of benchmarks/test_checkpoints.py,
# each tool's CLI in its own process, one after the other; wall time and peak RSS from
# /usr/bin/time, then how close the outputs are (benchmarks/compare_outputs.py).
#
#   benchmarks/vs_mergekit.sh [WORKDIR]          (default /tmp/fastmerge-vs-mergekit)
#   METHODS="slerp model_stock breadcrumbs sce nuslerp multislerp karcher passthrough" benchmarks/vs_mergekit.sh
#
# mergekit goes into its own venv (WORKDIR/mkvenv: torch==2.13.0 first, so pip keeps the CPU build,
# then mergekit==0.1.5). Needs about 12 GB of disk in WORKDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/fastmerge-vs-mergekit}
FM=${FASTMERGE:-$PWD/.venv/bin/fastmerge}
PY=${PYTHON:-$PWD/.venv/bin/python}
mkdir -p "$WORK"

if [ ! -x "$WORK/mkvenv/bin/mergekit-yaml" ]; then
  python3 -m venv "$WORK/mkvenv" && "$WORK/mkvenv/bin/pip" install -q torch==2.13.0 &&
    "$WORK/mkvenv/bin/pip" install -q mergekit==0.1.5 || { echo "mergekit did not install"; exit 1; }
fi
MK=$WORK/mkvenv/bin/mergekit-yaml

# checkpoints (1.58 GB each) in model folders with the config.json mergekit needs
for m in base a b c; do
  mkdir -p "$WORK/$m"
  [ -f "$WORK/$m/model.safetensors" ] || $PY -c "import sys; sys.path.insert(0, 'benchmarks')
from test_checkpoints import make_checkpoint
m = '$m'; make_checkpoint('$WORK/' + m + '/model.safetensors', 0 if m == 'base' else ' abc'.index(m), base=None if m == 'base' else 0)"
  $PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); import test_checkpoints as t
json.dump({'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': t.DIM,
           'intermediate_size': t.HIDDEN, 'num_hidden_layers': t.LAYERS, 'num_attention_heads': 16,
           'num_key_value_heads': 16, 'vocab_size': t.VOCAB, 'max_position_embeddings': 2048,
           'rms_norm_eps': 1e-6, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
           'hidden_act': 'silu'}, open('$WORK/$m/config.json', 'w'))"
done

models() { for m in "$@"; do echo "  - model: $WORK/$m"; echo "    parameters: {weight: ${WEIGHT:-1.0}${DENSITY:-, density: 0.5}}"; done; }
{ echo "merge_method: linear"; echo "models:"; WEIGHT=0.5 DENSITY=" " models a b; echo "dtype: bfloat16"; } > "$WORK/linear.yaml"
{ echo "merge_method: ties"; echo "base_model: $WORK/base"; echo "models:"; models a b c
  echo "parameters: {normalize: true}"; echo "dtype: bfloat16"; } > "$WORK/ties.yaml"
{ echo "merge_method: dare_linear"; echo "base_model: $WORK/base"; echo "models:"; models a b c
  echo "parameters: {normalize: false}"; echo "dtype: bfloat16"; } > "$WORK/dare.yaml"
# mergekit's random-mask methods: fastmerge runs them with its own draws (--own-masks, below)
for method in dare_ties della; do
  { echo "merge_method: $method"; echo "base_model: $WORK/base"; echo "models:"; models a b c
    echo "parameters: {normalize: true}"; echo "dtype: bfloat16"; } > "$WORK/$method.yaml"
done
# the methods fastmerge added for mergekit's configs (METHODS="... slerp model_stock ..." runs them)
plain() { for m in "$@"; do echo "  - model: $WORK/$m"; done; }
{ echo "merge_method: slerp"; echo "base_model: $WORK/a"; echo "models:"; plain a b; echo "parameters: {t: 0.3}"; } > "$WORK/slerp.yaml"
{ echo "merge_method: model_stock"; echo "base_model: $WORK/base"; echo "models:"; plain a b c; } > "$WORK/model_stock.yaml"
{ echo "merge_method: breadcrumbs"; echo "base_model: $WORK/base"; echo "models:"; DENSITY=", density: 0.9" models a b c; } > "$WORK/breadcrumbs.yaml"
{ echo "merge_method: sce"; echo "base_model: $WORK/base"; echo "models:"; plain a b c; echo "parameters: {select_topk: 0.5}"; } > "$WORK/sce.yaml"
{ echo "merge_method: nuslerp"; echo "models:"; WEIGHT=0.5 DENSITY=" " models a b; } > "$WORK/nuslerp.yaml"
{ echo "merge_method: multislerp"; echo "models:"; WEIGHT=1.0 DENSITY=" " models a b c; } > "$WORK/multislerp.yaml"
{ echo "merge_method: karcher"; echo "models:"; plain a b c; } > "$WORK/karcher.yaml"
{ echo "merge_method: passthrough"; echo "slices:"; echo "  - sources: [{model: $WORK/a, layer_range: [0, 8]}]"
  echo "  - sources: [{model: $WORK/b, layer_range: [4, 13]}]"; } > "$WORK/passthrough.yaml"

one() {  # name output command...: a fresh output, no pending writeback, then the timed run
  local name=$1 out=$2; shift 2
  rm -rf "$out"; sync
  /usr/bin/time -f "$name: %e s, peak RSS %M KB" "$@" > "$WORK/$name.log" 2>&1 || { echo "$name FAILED"; tail -5 "$WORK/$name.log"; }
  grep "peak RSS" "$WORK/$name.log"
}
# fastmerge reads the same config files (mergekit-yaml's form); DARE is fastmerge's own (hashed
# masks: mergekit's dare_linear draws torch's), from the command line; TIES also with
# --mergekit-compat (mergekit's bfloat16 arithmetic)
three=("$WORK/a/model.safetensors" "$WORK/b/model.safetensors" "$WORK/c/model.safetensors" --base "$WORK/base/model.safetensors")
flags=(--quiet --no-copy-tokenizer --no-write-model-card)
for method in ${METHODS:-linear ties ties_compat dare}; do
  case $method in
    dare) args=("${three[@]}" --method dare --density 0.5 -o "$WORK/fm_$method") ;;
    ties_compat) args=("$WORK/ties.yaml" "$WORK/fm_$method" --mergekit-compat) ;;
    dare_ties|della) args=("$WORK/$method.yaml" "$WORK/fm_$method" --own-masks) ;;
    *) args=("$WORK/$method.yaml" "$WORK/fm_$method") ;;
  esac
  one "fastmerge_$method" "$WORK/fm_$method" "$FM" merge "${args[@]}" "${flags[@]}"
  [ $method = ties_compat ] && continue
  one "mergekit_$method" "$WORK/mk_$method" "$MK" "$WORK/$method.yaml" "$WORK/mk_$method" --no-copy-tokenizer --no-write-model-card --quiet
done
$PY benchmarks/compare_outputs.py "$WORK" ${METHODS:-linear ties ties_compat dare}
