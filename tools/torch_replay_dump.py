"""Trains tools/torch_reference_dlrm.py's PyTorch DLRM for one seed and saves what a replay
in TensorFlow needs: the initial weights, each epoch's batch order, the loss of every step
and the held-out AUC.  Run in the torch venv (see tools/README.md).

Usage: python torch_replay_dump.py FILE.npz SEED OUT.npz [--lr 0.1] [--batch-size 128] [--epochs 3]
"""
import argparse

import numpy as np
import torch

from tools.torch_reference_dlrm import DLRM, held_out_auc, load, train


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npz")
    p.add_argument("seed", type=int)
    p.add_argument("out")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    data, train_data, held_out, labels = load(args.npz)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = DLRM(data["rows"])
    # tables 0..25, then (weight [out, in], bias) per Linear: bottom MLP, top MLP
    initial = {f"p{i}": t.detach().numpy().copy() for i, t in enumerate(model.parameters())}
    orders, losses = train(model, train_data, args.lr, args.batch_size, args.epochs)
    result = held_out_auc(model, held_out, labels)
    print(f"seed {args.seed}: held-out AUC {result:.4f}")
    np.savez(args.out, orders=np.stack(orders), losses=np.array(losses), auc=result,
             lr=args.lr, batch_size=args.batch_size, **initial)


if __name__ == "__main__":
    main()
