"""Run by test_train_ddp under torchrun: train a tiny adapter and save this rank's result."""

import os
import sys

from safetensors.torch import save_file

from asymlora.train import train
from test_train import TASKS, cfg, fresh
from tiny_models import tiny_tokenizer

out = sys.argv[1]
model = fresh(dropout=0.0)
train(model, tiny_tokenizer(), TASKS, cfg(batch_size=4, grad_accum=2), out)
rank = os.environ.get("RANK", "0")
save_file({k: v.contiguous() for k, v in model.adapter_state_dict().items()}, f"{out}/rank{rank}.safetensors")
