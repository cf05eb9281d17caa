"""Load a checkpoint on every rank, check the report, and run one forward pass.

    python examples/load_and_generate.py [CHECKPOINT]                        # one rank
    torchrun --nproc-per-node 2 examples/load_and_generate.py CKPT --tp 2    # two ranks
"""

import argparse

import torch

import distload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    directory = args.checkpoint or distload.example_checkpoint()
    with distload.load(directory, distload.LoadConfig(tp=args.tp, device="cpu"), keep_group=True) as loaded:
        if loaded.rank == 0:
            print(loaded.report.format_text())
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            logits = loaded.model(ids)
        if loaded.rank == 0 and logits is not None:
            print("next token after [1, 2, 3, 4]:", int(logits[0, -1].argmax()))


if __name__ == "__main__":
    main()
