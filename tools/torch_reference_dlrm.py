"""A PyTorch DLRM with the reference's math, trained on a .npz from dump_dataset_npz.py.

Follows facebookresearch/dlrm's dlrm_s_pytorch.py for the Kaggle configuration:
EmbeddingBag(sum) tables initialised uniform(+-sqrt(1/rows)); MLP weights
normal(0, sqrt(2/(fan_in+fan_out))), biases normal(0, sqrt(1/fan_out)); bottom MLP
13-512-256-64-16 all ReLU; dot interaction without self pairs, concatenated with the
bottom output; top MLP 367-512-256-1 with a sigmoid on the last layer; BCELoss(mean);
torch.optim.SGD over all parameters; shuffled mini-batches each epoch.

Usage (from the repository root): TORCH_PYTHON -m tools.torch_reference_dlrm FILE.npz [--seeds 1,2,3] [--lr 0.1] [--batch-size 128] [--epochs 3] [--per-epoch]
"""
import argparse

import numpy as np
import torch
import torch.nn as nn

from tfdlrm.metrics import exact_auc  # numpy only (run from the repository root: python -m tools....)

DIM = 16


def mlp(widths, sigmoid_layer):
    layers = []
    for i in range(len(widths) - 1):
        n, m = widths[i], widths[i + 1]
        linear = nn.Linear(n, m, bias=True)
        linear.weight.data = torch.tensor(np.random.normal(0.0, np.sqrt(2 / (m + n)), size=(m, n)).astype(np.float32))
        linear.bias.data = torch.tensor(np.random.normal(0.0, np.sqrt(1 / m), size=m).astype(np.float32))
        layers += [linear, nn.Sigmoid() if i == sigmoid_layer else nn.ReLU()]
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.tables = nn.ModuleList()
        for n in rows:
            table = nn.EmbeddingBag(int(n), DIM, mode="sum", sparse=True)
            table.weight.data = torch.tensor(
                np.random.uniform(-np.sqrt(1 / n), np.sqrt(1 / n), size=(n, DIM)).astype(np.float32))
            self.tables.append(table)
        self.bottom = mlp([13, 512, 256, 64, DIM], -1)
        vectors = len(rows) + 1
        self.li = [i for i in range(vectors) for j in range(i)]
        self.lj = [j for i in range(vectors) for j in range(i)]
        top_in = DIM + vectors * (vectors - 1) // 2
        self.top = mlp([top_in, 512, 256, 1], 2)

    def forward(self, dense, sparse):
        x = self.bottom(dense)
        batch = dense.shape[0]
        offsets = torch.arange(batch)
        embedded = [table(sparse[:, k], offsets) for k, table in enumerate(self.tables)]
        t = torch.cat([x] + embedded, dim=1).view((batch, -1, DIM))
        z = torch.bmm(t, torch.transpose(t, 1, 2))
        return self.top(torch.cat([x, z[:, self.li, self.lj]], dim=1))


def load(path):
    """The .npz's training tensors, held-out tensors and held-out labels."""
    data = np.load(path)
    train = (torch.tensor(data["tr_dense"]), torch.tensor(data["tr_sparse"]).long(), torch.tensor(data["tr_y"]))
    held_out = (torch.tensor(data["te_dense"]), torch.tensor(data["te_sparse"]).long())
    return data, train, held_out, data["te_y"].ravel()


def train(model, train_data, lr, batch_size, epochs, after_epoch=None):
    """Plain SGD on shuffled mini-batches (the last one of an epoch shorter); returns each
    epoch's order and every step's loss.  ``after_epoch(epoch)`` runs after each epoch."""
    dense, sparse, labels = train_data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.BCELoss(reduction="mean")
    orders, losses = [], []
    for epoch in range(epochs):
        order = torch.randperm(len(dense))
        orders.append(order.numpy())
        for i in range(0, len(dense), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(dense[idx], sparse[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if after_epoch is not None:
            after_epoch(epoch)
    return orders, losses


def held_out_auc(model, held_out, labels):
    with torch.no_grad():
        return exact_auc(labels, model(*held_out).numpy().ravel())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npz")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--per-epoch", action="store_true", help="also print the held-out AUC after each epoch")
    args = p.parse_args()
    torch.set_num_threads(2)
    data, train_data, held_out, labels = load(args.npz)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = DLRM(data["rows"])
        report = (lambda epoch: print(f"  epoch {epoch + 1}: {held_out_auc(model, held_out, labels):.4f}")
                  ) if args.per_epoch else None
        train(model, train_data, args.lr, args.batch_size, args.epochs, report)
        results.append(held_out_auc(model, held_out, labels))
        print(f"seed {seed}: held-out AUC {results[-1]:.4f}", flush=True)
    print(f"mean {np.mean(results):.4f}  std {np.std(results, ddof=1) if len(results) > 1 else 0:.4f}  "
          f"over {len(results)} seeds")


if __name__ == "__main__":
    main()
