"""d2l's LeNet recipe in PyTorch on the full Fashion-MNIST: the reference wall time for
`dlc train specs/lenet.dlc` (README, "Speed").

Same recipe as the spec: sigmoid LeNet, Xavier-uniform weights, SGD lr 0.9, batch 256,
10 epochs, shuffled every epoch, test accuracy after every epoch. The images are read once
into memory from the Debian package dataset-fashion-mnist (IDX, gzip) and batched by
indexing, so no data-loader workers compete for the cores.

    /work/venv/bin/python benches/lenet_torch.py [--epochs 10] [--threads 2] [--dir DIR]
"""

import argparse
import gzip
import os
import time

import numpy as np
import torch
from torch import nn


def read_idx(path):
    """The array in an IDX file (gzip), as numpy."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(folder, split):
    """Images as float [N, 1, 28, 28] in [0, 1] and labels as int64 [N]."""
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(y.astype(np.int64))


def lenet():
    """d2l's LeNet (sigmoid, average pooling) with Xavier-uniform weights."""
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return net


def accuracy(net, x, y, batch):
    """Share of correctly classified examples, evaluated in batches without gradients."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += (net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    net.train()
    return correct / len(y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dir", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_x, train_y = load(args.dir, "train")
    test_x, test_y = load(args.dir, "test")
    net = lenet()
    opt = torch.optim.SGD(net.parameters(), lr=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batch = 256
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(train_y))
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            x, y = train_x[idx], train_y[idx]
            out = net(x)
            loss = loss_fn(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        test_acc = accuracy(net, test_x, test_y, batch)
        print(
            f"epoch {epoch}: loss {total / seen:.3f}, train acc {correct / seen:.3f}, "
            f"test acc {test_acc:.3f}, {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
