"""Store a checkpoint's weights in float16: half the bytes in the package and in git, loaded back as float32.

    python scripts/half_checkpoint.py training/mp_20-cpu/best.pt /work/ckpt/mp_20-half.pt

Every parameter of the network (not its buffers) is rounded to float16 (10-bit mantissa: a relative error of at
most 2^-11 ≈ 4.9e-4 a weight); :func:`equicsp_core.checkpoint.load_model` copies them into the float32 network as
it loads any checkpoint, so nothing else changes. The script measures what the rounding does to the denoiser
(:func:`equicsp_core.diffusion.output_change`: relative change of its outputs on the first 256 selection rows of
the model's dataset, at a random t each, seed 0), prints it and records it in the card (``stored_dtype``,
``half_output_change``) with a new ``model_sha256``. Evaluate the written file, then ship that file
(``scripts/ship_checkpoint.py``): the card's figures are then those of the compact weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from equicsp_core.checkpoint import load_model, model_sha256, read_checkpoint, write_payload
from equicsp_core.crystal import CrystalBatch
from equicsp_core.diffusion import output_change
from equicsp_core.splits import load_rows, split_rows

#: Selection rows on which the rounding's effect is measured.
CRYSTALS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args()
    payload = read_checkpoint(args.checkpoint)
    if payload["card"].get("stored_dtype") == "float16":
        parser.error(f"{args.checkpoint} already stores float16 weights")
    model, card = load_model(args.checkpoint)
    parameters = {name for name, _ in model.net.named_parameters()}
    payload["state_dict"] = {name: tensor.half() if name in parameters and tensor.dtype == torch.float32 else tensor
                             for name, tensor in payload["state_dict"].items()}
    payload["model_sha256"] = model_sha256(payload["denoiser"], payload["diffusion"], payload["state_dict"])
    rows = split_rows(card["dataset"], "selection")[:CRYSTALS]
    crystals = CrystalBatch.collate(load_rows(card["dataset"], rows, progress=False))
    half = type(model)(model.denoiser_config, model.config)
    half.net.load_state_dict(payload["state_dict"])
    with torch.no_grad():
        change = output_change(model, half.eval(), crystals, torch.Generator().manual_seed(0))
    payload["card"] = {**payload["card"], "stored_dtype": "float16",
                       "half_output_change": {"split": "selection", "crystals": len(rows), **change}}
    write_payload(payload, Path(args.out))
    read_checkpoint(args.out)  # loads back with weights_only=True, its model hash checked
    print(json.dumps({"out": args.out, "half_output_change": payload["card"]["half_output_change"]}))


if __name__ == "__main__":
    main()
