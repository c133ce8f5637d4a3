#!/usr/bin/env bash
# The command line's GPU path end to end, on a tiny random-init Llama and three small multiple-choice
# task files (nothing is downloaded): train ALoRA over a bfloat16 base with activation checkpointing,
# once through and once killed (kill -9) and resumed, comparing the two adapters, evaluate the
# adapter, load the PEFT folder it wrote with PEFT on the CPU, run a Fed-ALoRA-het federation, and
# compare LoRA with ALoRA. Each step must succeed (set -e); the numbers are printed, not judged: the
# model is random.
#   scripts/gpu_check.sh [WORKDIR]              # on a CUDA machine; WORKDIR new or empty
#   DEVICE=cpu scripts/gpu_check.sh [WORKDIR]   # the same steps on a CPU
# PYTHON names the interpreter (default python3; this checkout's src/ goes first on its path).
set -euo pipefail
device=${DEVICE:-cuda}
work=${1:-$(mktemp -d)}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -z "$(ls -A "$work" 2>/dev/null)" ] || { echo "gpu_check.sh: $work is not empty; give a new folder" >&2; exit 2; }
mkdir -p "$work"
cli=("$py" -c 'import sys; from asymlora.cli import main; sys.exit(main(sys.argv[1:]))')
asymlora() { "${cli[@]}" "$@"; }
steps=${STEPS:-200}  # training steps of the train runs; the second is killed a little after half way
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "three task files"
"$py" - "$work" <<'EOF'
import json, sys
from pathlib import Path
sounds = ["meow", "woof", "moo"]
for task, answer in zip(["cats", "dogs", "cows"], range(3)):
    with (Path(sys.argv[1]) / f"{task}.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"the {task} number {i} say", "choices": sounds, "answer": answer}) + "\n")
EOF
tasks="$work/cats.jsonl,$work/dogs.jsonl,$work/cows.jsonl"
tiny=(--model tiny-llama --set "device=$device" --set dtype=bfloat16 --set train.batch_size=8
      --set train.max_length=32 --set adapter.r=4 --set "adapter.target_modules=['q_proj','o_proj']"
      --set eval.limit=12)

step "train ALoRA (task router), bfloat16 base, activation checkpointing: once through, and killed then resumed"
train=(--tasks "$tasks" --method alora --steps "$steps" "${tiny[@]}" --set adapter.router=task
       --set train.activation_checkpointing=true --set train.lr=3e-3 --set "train.save_every=$((steps / 8))")
asymlora train "${train[@]}" --out "$work/train"
"${cli[@]}" train "${train[@]}" --out "$work/killed" > "$work/killed.log" 2>&1 &
pid=$!
until [ "$(cat "$work/killed/metrics.jsonl" 2>/dev/null | wc -l)" -ge $((steps * 55 / 100)) ] || ! kill -0 $pid 2>/dev/null; do
  sleep 0.02
done
kill -9 $pid 2>/dev/null || { echo "the run ended before it could be killed: see $work/killed.log" >&2; exit 1; }
echo "killed at step $(wc -l < "$work/killed/metrics.jsonl")"
wait $pid || true
asymlora train --config "$work/killed/config.yaml" --resume
"$py" - "$work" <<'EOF2'
import sys
from pathlib import Path
from safetensors.torch import load_file
work = Path(sys.argv[1])
a, b = (load_file(work / run / "adapter" / "adapter_model.safetensors") for run in ("train", "killed"))
diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
print(f"killed and resumed vs once through: {'bit for bit equal' if all(a[k].equal(b[k]) for k in a) else f'max |difference| {diff:.3g}'}")
EOF2
step "eval the adapter"
asymlora eval --adapter "$work/train" --task "$work/cats.jsonl" --limit 12 --out "$work/eval"
step "the PEFT folder that train wrote for one task, scored through PEFT on the CPU"
"$py" - "$work" <<'EOF'
import sys
from pathlib import Path
import torch
from peft import PeftModel
from asymlora.models import load_model
base, tok = load_model("tiny-llama")
model = PeftModel.from_pretrained(base, Path(sys.argv[1]) / "train" / "peft" / "cats").eval()
ids = tok("the cats number 1 say meow", return_tensors="pt")
with torch.no_grad():
    print("PEFT reload: loss", float(model(**ids, labels=ids["input_ids"]).loss))
EOF
step "federate: Fed-ALoRA-het, ranks 4,2,2, 3 rounds of 4 local steps"
asymlora federate --method fedalora-het --tasks "$tasks" --ranks 4,2,2 --rounds 3 --out "$work/fed" \
  "${tiny[@]}" --set train.steps=4 --set adapter.d_m=3
step "compare LoRA and ALoRA, one seed"
asymlora compare --methods lora,alora --seeds 0 --tasks "$tasks" --steps 12 --out "$work/compare" "${tiny[@]}" \
  --set train.activation_checkpointing=true
step "done: every step succeeded on $device; outputs in $work"
