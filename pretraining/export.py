"""Export a training checkpoint to an ordinary HuggingFace BERT directory.

    biobert export CKPT_DIR OUT_DIR

CKPT_DIR is one checkpoint (``<output_dir>/checkpoints/step_00001000``) or the checkpoints root (-> the newest
complete one). Any ZeRO stage: the fp32 master weights are consolidated with DeepSpeed's zero_to_fp32 (so an fp16/bf16
run exports full precision); without ZeRO the module weights are read directly. The checkpoint carries its own model
config and tokenizer files (``hf/``), so nothing else is needed. An incomplete checkpoint (no completion marker, or a
file missing/truncated) is refused. The result loads with ``transformers.AutoModelForPreTraining``/``AutoModel`` and with
``pretraining.model.load_pretrained``; a vocab padded for tensor cores is sliced back to the tokenizer's size.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from biobert.config import option, parse
from biobert.errors import run
from pretraining import checkpoint as ckpt

log = logging.getLogger(__name__)


def fp32_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a complete checkpoint folder, names as in the model (``module.`` stripped)."""
    if any(folder.glob("*optim_states.pt")) and ckpt.read_marker(folder)["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    # No ZeRO: fp32 runs keep the weights in the module; fp16/bf16 ones keep fp32 masters in the optimizer state.
    state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = {k: v.float() for k, v in state["module"].items()}
    if "fp32_groups_flat" in (state.get("optimizer") or {}):
        log.warning("%s: no ZeRO and half precision: exporting the module's half-precision weights upcast", folder)
    return module


def export(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    from transformers import BertConfig

    from pretraining.model import BertForPreTraining, load_state_dict_into, save_pretrained

    folder = ckpt.resolve(checkpoint_dir)  # raises on an incomplete checkpoint
    hf = folder / ckpt.HF_SUBDIR
    if not (hf / "config.json").is_file():
        raise FileNotFoundError(f"{hf}/config.json missing: not a checkpoint written by pretraining/trainer.py")
    config = BertConfig.from_json_file(str(hf / "config.json"))
    model = BertForPreTraining(config)
    result = load_state_dict_into(model, fp32_state_dict(folder), str(folder))
    if result["missing"] or result["unexpected"]:
        raise ValueError(f"{folder}: checkpoint does not match its config: missing {result['missing']}, "
                         f"unexpected {result['unexpected']}")
    tokenizer = hf if any((hf / n).is_file() for n in ("vocab.txt", "tokenizer.json")) else None
    out = save_pretrained(model, out_dir, tokenizer_dir=tokenizer)
    log.info("exported %s -> %s", folder, out)
    return out


@dataclass(kw_only=True)
class ExportConfig:
    """A training checkpoint -> a HuggingFace model directory."""

    checkpoint_dir: str = option(help="a step_* checkpoint folder, or a run's checkpoints/ (-> the newest complete "
                                      "one)", positional=True)
    out_dir: str = option(help="the HF model directory to write (replaced atomically)", positional=True)


def cli(argv: list[str] | None = None) -> int:
    cfg = parse(ExportConfig, argv, prog="biobert export", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(export(cfg.checkpoint_dir, cfg.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
