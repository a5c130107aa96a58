"""Export a training checkpoint to an ordinary HuggingFace BERT directory.

    biobert export CKPT_DIR OUT_DIR

CKPT_DIR is one checkpoint (``<output_dir>/checkpoints/step_00001000``) or the checkpoints root (-> the newest
complete one). Any ZeRO stage: the fp32 master weights are consolidated with DeepSpeed's zero_to_fp32 (so an fp16/bf16
run exports full precision); without ZeRO the module weights are read directly. The checkpoint carries its own model
config and tokenizer files (``hf/``), so nothing else is needed. An incomplete checkpoint (no completion marker, or a
file missing/truncated) is refused. The result loads with ``transformers.AutoModelForPreTraining``/``AutoModel`` and with
``pretraining.model.load_pretrained``; a vocab padded for tensor cores is sliced back to the tokenizer's size.

The directory also says where it came from (pretraining.model_card): ``README.md`` (a model card with HF front matter:
base model, language, tags, licence), ``provenance.json`` (base model, corpus manifest hash and size, steps, samples,
tokens seen, final validation loss/perplexity, commands) and ``training_config.json`` (the resolved run config);
``config.json``'s ``_name_or_path`` names the base model. Files are 0644, the directory is swapped in whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from biobert.config import option, parse
from biobert.errors import run
from biobert.files import publish_dir, temp_dir_for
from pretraining import checkpoint as ckpt
from pretraining import model_card

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


def export(checkpoint_dir: str | Path, out_dir: str | Path, *, license: str | None = None) -> Path:
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
    state = model_card.client_state(folder)
    command = ["biobert", "export", str(checkpoint_dir), str(out_dir), *(["--license", license] if license else [])]
    prov = model_card.provenance(folder, ckpt.read_marker(folder), state, license=license, export_command=command)
    stage = temp_dir_for(out_dir)  # model + card + provenance are built here, then renamed into place together
    try:
        staged = save_pretrained(model, stage / "model", tokenizer_dir=tokenizer)
        _name_base(staged / "config.json", prov["base_model"])
        (staged / model_card.PROVENANCE).write_text(json.dumps(prov, indent=2, default=str) + "\n")
        if state.get("run_config"):
            (staged / model_card.TRAINING_CONFIG).write_text(json.dumps(state["run_config"], indent=2) + "\n")
        (staged / model_card.CARD).write_text(model_card.model_card(prov, Path(out_dir).name), encoding="utf-8")
        out = publish_dir(staged, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("exported %s -> %s", folder, out)
    return out


def _name_base(config_json: Path, base: dict) -> None:
    """config.json's _name_or_path names the model this one was trained from (as HF fine-tunes do), not ""."""
    config = json.loads(config_json.read_text())
    config["_name_or_path"] = base.get("hub_id") or base.get("spec") or f"from scratch ({base.get('from_scratch')})"
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass(kw_only=True)
class ExportConfig:
    """A training checkpoint -> a HuggingFace model directory."""

    checkpoint_dir: str = option(help="a step_* checkpoint folder, or a run's checkpoints/ (-> the newest complete "
                                      "one)", positional=True)
    out_dir: str = option(help="the HF model directory to write (replaced atomically)", positional=True)
    license: str | None = option(None, "licence for the model card's front matter (default: the base model's, when "
                                       "its card states one)")


def main(cfg: ExportConfig) -> Path:
    return export(cfg.checkpoint_dir, cfg.out_dir, license=cfg.license)


def cli(argv: list[str] | None = None) -> int:
    cfg = parse(ExportConfig, argv, prog="biobert export", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(main(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
