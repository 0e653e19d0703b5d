"""Save a ParScale adapter with its model card, and push it to the Hugging Face Hub.

The card (README.md) gets ``library_name: peft``, the base model, the tag ``parscale``, the adapter's P and prefix
length, and a loading snippet that starts with ``import peft_parscale``; ``push_to_hub`` uploads the adapter's
config, weights and that card. The base model is the one the adapter records (``base_model_name_or_path``), or
``--base-model``, which the saved or pushed adapter then records instead: for an adapter that recorded a local path,
name the Hub model it was trained on. A packaged model's Hub id loads its local copy (`peft_parscale.pretrained`).

    python examples/hub.py --adapter quickstart-output/P2 --save-dir my-adapter           # save only, show the card
    huggingface-cli login   # or HF_TOKEN=...
    python examples/hub.py --adapter quickstart-output/P2 --repo-id you/qwen2.5-coder-0.5b-parscale-p2
    python examples/hub.py --adapter old-adapter --base-model Qwen/Qwen2.5-Coder-0.5B-Instruct --save-dir fixed
    python examples/hub.py --smoke --save-dir /tmp/card                                    # a tiny random model
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft import PeftConfig, PeftModel, get_peft_model

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig
from peft_parscale.pretrained import load_causal_lm, name_base_model
from peft_parscale.testing import temporary_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="a saved ParScale adapter directory")
    parser.add_argument("--base-model", help="Hub id or path of its base model (default: the one the adapter records)")
    parser.add_argument("--save-dir", help="write the adapter and its card here")
    parser.add_argument("--repo-id", help="push to this Hub repository (needs a token: HF_TOKEN or a login)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a fresh adapter on a tiny random model")
    args = parser.parse_args()
    if not (args.adapter or args.smoke) or not (args.save_dir or args.repo_id):
        parser.error("pass --adapter DIR (or --smoke), and --save-dir and/or --repo-id")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there")

    if args.smoke:
        model = get_peft_model(load_causal_lm(temporary_tiny_checkpoint()), ParScaleConfig(P=2, prefix_length=4))
    else:
        base_model = args.base_model or PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
        try:
            model = PeftModel.from_pretrained(load_causal_lm(base_model), args.adapter)
        except OSError as error:
            parser.error(f"cannot load the base model {base_model!r} ({error}); name it with --base-model")
    if args.base_model:
        name_base_model(model, args.base_model)

    if args.save_dir:
        model.save_pretrained(args.save_dir)
        card = (Path(args.save_dir) / "README.md").read_text()
        print(card.split("<!-- parscale:end -->")[0])
        print(f"Saved to {args.save_dir}: {sorted(p.name for p in Path(args.save_dir).iterdir())}")
    if args.repo_id:
        commit = model.push_to_hub(args.repo_id, private=args.private)
        print(f"Pushed to {args.repo_id}: {commit}")


if __name__ == "__main__":
    main()
