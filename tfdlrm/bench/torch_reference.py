"""Train facebookresearch/dlrm's own ``DLRM_Net`` on the rows of an ``.npz`` (``bench fit --reference``).

A script for a Python that has PyTorch, run by ``tfdlrm.bench.reference`` as

    TORCH_PYTHON torch_reference.py --checkout DIR --npz FILE --batch-size 128 --lr 0.1 [--threads N]
    TORCH_PYTHON torch_reference.py --floor --batch-size 128 [--tables 26 --bottom-mlp ... --top-mlp ...]

It imports nothing of tfdlrm (nor TensorFlow): ``DLRM_Net`` comes from ``dlrm_s_pytorch.py`` of the
reference's checkout, built with the widths of the rows' tables and the kaggle MLPs (or those
given), and trained one epoch over the ``.npz``'s training rows in their stored order, batch after
batch as the reference's training loop does (forward, BCE loss read back to the host, zero_grad,
backward, SGD step); the held-out rows are then scored.  One JSON line on stdout:
``examples_per_second`` (the epoch's rows over its wall time, batch slicing included),
``train_seconds``, ``cpu_seconds``, ``auc``, ``torch``, ``threads``.
"""
import os
import sys

# This file's folder (tfdlrm/bench) holds a profile.py: off the path, or it hides the standard library's.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def rank_auc(labels, scores):
    """ROC AUC with ties averaged (the Mann-Whitney statistic)."""
    import numpy as np

    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    cut = np.flatnonzero(np.diff(ordered)) + 1
    starts, ends = np.r_[0, cut], np.r_[cut, len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    positive = labels.sum()
    return float((ranks[labels == 1].sum() - positive * (positive + 1) / 2) / (positive * (len(labels) - positive)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", help="a checkout of facebookresearch/dlrm")
    p.add_argument("--npz", help="tr_dense, tr_sparse, tr_y, te_dense, te_sparse, te_y, rows")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--bottom-mlp", default="13-512-256-64-16")
    p.add_argument("--top-mlp", default="512-256-1", help="without its input width")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--qr-collisions", type=int, default=0, help="the reference's QR tables (--qr-flag)")
    p.add_argument("--qr-operation", default="mult")
    p.add_argument("--qr-threshold", type=int, default=200)
    p.add_argument("--md-temperature", type=float, default=0.0, help="the reference's MD tables (--md-flag)")
    p.add_argument("--md-threshold", type=int, default=200)
    p.add_argument("--md-round-dims", action="store_true")
    p.add_argument("--floor", action="store_true",
                   help="instead: PyTorch's MLP-only floor at --batch-size (tfdlrm/bench/floor.py's, in PyTorch)")
    p.add_argument("--tables", type=int, default=26, help="--floor: categorical features (the top MLP's input)")
    args = p.parse_args()
    if args.floor:
        return floor(args)
    if not args.checkout or not args.npz:
        p.error("--checkout and --npz are needed (or --floor)")

    sys.path.insert(0, os.path.abspath(args.checkout))
    sys.argv = [sys.argv[0]]
    with contextlib.redirect_stdout(io.StringIO()):  # its optional imports (onnx, mlperf) print
        import dlrm_s_pytorch as reference
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    np.random.seed(args.seed)  # DLRM_Net draws its initial weights from numpy, as the reference's run
    torch.manual_seed(args.seed)
    data = np.load(args.npz)
    rows = np.array(data["rows"], dtype=np.int64)
    bottom = np.array([int(w) for w in args.bottom_mlp.split("-")])
    vectors = len(rows) + 1
    top = np.array([int(bottom[-1]) + vectors * (vectors - 1) // 2] + [int(w) for w in args.top_mlp.split("-")])
    dim = int(bottom[-1]) // (2 if args.qr_collisions and args.qr_operation == "concat" else 1)
    m_spa = dim
    if args.md_temperature:  # as the reference's main(): a width a table by its md_solver
        from tricks.md_embedding_bag import md_solver

        m_spa = md_solver(torch.tensor(rows), args.md_temperature, d0=dim, round_dim=args.md_round_dims).tolist()
    net = reference.DLRM_Net(m_spa=m_spa, ln_emb=rows, ln_bot=bottom, ln_top=top,
                             arch_interaction_op="dot", arch_interaction_itself=False, sigmoid_bot=-1,
                             sigmoid_top=len(top) - 2, loss_function="bce", qr_flag=bool(args.qr_collisions),
                             qr_operation=args.qr_operation, qr_collisions=args.qr_collisions,
                             qr_threshold=args.qr_threshold, md_flag=bool(args.md_temperature),
                             md_threshold=args.md_threshold)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)

    def batch_of(dense, sparse, i, n):
        ids = sparse[i:i + n]
        count = len(ids)
        offsets = [torch.arange(count) for _ in range(ids.shape[1])]
        return dense[i:i + n], offsets, [ids[:, k].contiguous() for k in range(ids.shape[1])]

    dense = torch.from_numpy(np.ascontiguousarray(data["tr_dense"], np.float32))
    sparse = torch.from_numpy(np.ascontiguousarray(data["tr_sparse"], np.int64))
    labels = torch.from_numpy(np.ascontiguousarray(data["tr_y"], np.float32).reshape(-1, 1))
    n = len(labels)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, args.batch_size):
        x, offsets, ids = batch_of(dense, sparse, i, args.batch_size)
        z = net(x, offsets, ids)
        loss = net.loss_fn(z, labels[i:i + args.batch_size])
        loss.detach().cpu().numpy()  # the reference's loop reads every step's loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu

    held_dense = torch.from_numpy(np.ascontiguousarray(data["te_dense"], np.float32))
    held_sparse = torch.from_numpy(np.ascontiguousarray(data["te_sparse"], np.int64))
    scores = []
    with torch.no_grad():
        for i in range(0, len(held_dense), 4096):
            scores.append(net(*batch_of(held_dense, held_sparse, i, 4096)).numpy().ravel())
    print(json.dumps({"examples": n, "examples_per_second": round(n / seconds), "train_seconds": round(seconds, 3),
                      "cpu_seconds": round(cpu, 2), "auc": round(rank_auc(np.asarray(data["te_y"]).ravel(),
                                                                          np.concatenate(scores)), 4),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))
    return 0


def floor(args) -> int:
    """The bottom and top MLPs alone in PyTorch, as tfdlrm's ``bench train`` times them in TensorFlow: no
    biases, ReLU between layers, a fixed stand-in for the interaction's output, logistic loss, backward,
    ``torch.optim.SGD``; one step a Python call (PyTorch's way).  JSON: ms a step, median of 5 runs."""
    import statistics

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bottom = [int(w) for w in args.bottom_mlp.split("-")]
    top = [int(w) for w in args.top_mlp.split("-")]
    vectors = args.tables + 1
    top = [bottom[-1] + vectors * (vectors - 1) // 2, *top]

    def weights(widths):
        return [torch.nn.Parameter(torch.tensor(rng.normal(0.0, np.sqrt(2.0 / (a + b)), (b, a)).astype(np.float32)))
                for a, b in zip(widths[:-1], widths[1:])]

    bottom_w, top_w = weights(bottom), weights(top)
    b = args.batch_size
    dense = torch.tensor(np.abs(rng.normal(size=(b, bottom[0]))).astype(np.float32))
    interaction = torch.tensor(rng.normal(size=(b, top[0] - bottom[-1])).astype(np.float32))
    labels = torch.tensor((rng.random((b, 1)) < 0.25).astype(np.float32))
    optimizer = torch.optim.SGD(bottom_w + top_w, lr=1e-4)

    def forward(ws, h, relu_last):
        for i, w in enumerate(ws):
            h = h @ w.t()
            if i < len(ws) - 1 or relu_last:
                h = torch.relu(h)
        return h

    def step():
        optimizer.zero_grad()
        logits = forward(top_w, torch.cat([forward(bottom_w, dense, True), interaction], dim=1), False)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        optimizer.step()

    steps = max(10, 25_600 // b)
    for _ in range(steps):
        step()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - start) / steps * 1000)
    print(json.dumps({"ms_per_step": round(statistics.median(runs), 3), "runs_ms_per_step": [round(r, 3) for r in runs],
                      "bottom_mlp": "-".join(map(str, bottom)), "top_mlp": "-".join(map(str, top)),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
