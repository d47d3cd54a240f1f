"""The PyTorch column of `cargo bench --bench train_step` (benches/train_step.rs).

The same nets, batch and step as the Rust side, f32 on the CPU, on one fixed random batch.
A training step is: forward in training mode, cross-entropy (over every time step for the
character models), backward, plain SGD (no momentum, no weight decay). An inference step
(`infer1`, `infer32`) is a forward pass in evaluation mode under `torch.no_grad()`.
Prints one JSON object on the last line of stdout:

    {"net", "params", "torch", "threads", "batch", "step_ms": [...], "forward_ms": [...],
     "backward_ms": [...], "update_ms": [...], "first_loss", "last_loss", "peak_mib",
     "resident_mib"}

or {"error": "..."} when torch cannot be imported. `peak_mib` is this process's resident
high-water mark (VmHWM, Linux) during those steps, reset before them as the Rust side does
("5" written to /proc/self/clear_refs, freed heap kept, as in a training loop); null
where the kernel does not allow it. `resident_mib` is the resident size once the model is
built, before any step. With --serve (what the bench uses, so that its rounds interleave the
three columns) it warms up, prints a {"ready": true, ...} line, then answers every stdin line "N" with the JSON of N more timed steps, until stdin closes.

    python benches/train_step_torch.py --net lenet --steps 20 --warmup 2
"""

import argparse
import json
import os
import sys
import time


def lenet(nn):
    # d2l §7.6 (LeNet-5 with sigmoid and average pooling).
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def d2l_resnet18(torch, nn):
    # d2l §8.6: Residual with biased 3×3 convs, a 1×1 conv projection when the shape changes.
    F = torch.nn.functional

    class Residual(nn.Module):
        def __init__(self, cin, c, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, c, kernel_size=3, padding=1, stride=stride)
            self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1)
            self.conv3 = nn.Conv2d(cin, c, kernel_size=1, stride=stride) if stride != 1 or cin != c else None
            self.bn1 = nn.BatchNorm2d(c)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if self.conv3 is not None:
                x = self.conv3(x)
            return F.relu(y + x)

    def stage(cin, c, first):
        return nn.Sequential(Residual(cin, c, 1 if first else 2), Residual(c, c, 1))

    b1 = nn.Sequential(
        nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    return nn.Sequential(
        b1, stage(64, 64, True), stage(64, 128, False), stage(128, 256, False), stage(256, 512, False),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 10),
    )


def char_model(nn, cell, vocab, hidden):
    # d2l's RNNModel (concise RNN chapter): one-hot tokens, one batch-first recurrent layer,
    # a linear layer to the vocabulary at every step.
    F = nn.functional

    class RNNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(vocab, hidden, batch_first=True)
            self.linear = nn.Linear(hidden, vocab)

        def forward(self, x):
            y, _ = self.rnn(F.one_hot(x, vocab).float())
            return self.linear(y)

    return RNNModel()


# Character models: vocabulary (d2l's Time Machine), hidden units, time steps.
VOCAB, HIDDEN, TIME_STEPS = 28, 256, 35

NETS = {
    # name: (batch, input shape, classes, training?); an input shape (T,) is T token ids.
    "lenet": (256, (1, 28, 28), 10, True),
    "resnet": (32, (1, 96, 96), 10, True),
    "mobilenet": (32, (3, 96, 96), 10, True),
    "lstm": (32, (TIME_STEPS,), VOCAB, True),
    "gru": (32, (TIME_STEPS,), VOCAB, True),
    "infer1": (1, (3, 224, 224), 1000, False),
    "infer32": (32, (3, 224, 224), 1000, False),
}


def build(torch, nn, net):
    if net == "lenet":
        return lenet(nn)
    if net == "resnet":
        return d2l_resnet18(torch, nn)
    import torchvision

    if net == "mobilenet":
        return torchvision.models.mobilenet_v2(num_classes=10)
    if net in ("infer1", "infer32"):
        return torchvision.models.resnet18()
    return char_model(nn, nn.LSTM if net == "lstm" else nn.GRU, VOCAB, HIDDEN)


def trim_heap():
    """Hands freed heap memory back to the system (glibc), as the Rust side does."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def status_mib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def resident_mib():
    """The resident size now (after handing freed heap memory back), in MiB."""
    trim_heap()
    return status_mib("VmRSS:")


def reset_peak():
    """Resets the resident high-water mark; False where the kernel does not allow it.

    Freed heap memory is not handed back first, as on the Rust side: that would make the
    first step after it fault its buffers in again, which a training loop never does."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", choices=sorted(NETS), required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--serve", action="store_true",
                    help="warm up, print a ready line, then run N timed steps per stdin line")
    args = ap.parse_args()

    try:
        import torch
        from torch import nn
    except Exception as e:  # noqa: BLE001 - any import failure means: no PyTorch column
        print(json.dumps({"error": f"torch not importable by {sys.executable}: {e}"}))
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, shape, classes, training = NETS[args.net]
    try:
        model = build(torch, nn, args.net)
    except Exception as e:  # noqa: BLE001 - e.g. no torchvision: no PyTorch column for this net
        print(json.dumps({"error": f"cannot build {args.net} with {sys.executable}: {e}"}))
        return 0
    model.train(training)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if len(shape) == 1:
        # Token ids [N, T]; the targets are one id per time step.
        x = torch.randint(0, classes, (batch, *shape))
        y = torch.randint(0, classes, (batch, *shape))
    else:
        x = torch.rand(batch, *shape)
        y = torch.randint(0, classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    def loss_fn(logits, targets):
        # Cross-entropy over every prediction: every image, or every time step of every sequence.
        return nn.functional.cross_entropy(logits.reshape(-1, classes), targets.reshape(-1))

    header = {
        "net": args.net,
        "params": params,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "resident_mib": resident_mib(),
    }
    losses = []

    def steps(n, timed):
        out = {"step_ms": [], "forward_ms": [], "backward_ms": [], "update_ms": []}
        measured = reset_peak()
        for _ in range(n):
            if not training:
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(x)
                t1 = time.perf_counter()
                if timed:
                    out["step_ms"].append((t1 - t0) * 1e3)
                    out["forward_ms"].append((t1 - t0) * 1e3)
                    out["backward_ms"].append(0.0)
                    out["update_ms"].append(0.0)
                continue
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            value = loss.item()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            losses.append(value)
            if timed:
                out["step_ms"].append((t3 - t0) * 1e3)
                out["forward_ms"].append((t1 - t0) * 1e3)
                out["backward_ms"].append((t2 - t1) * 1e3)
                out["update_ms"].append((t3 - t2) * 1e3)
        out["peak_mib"] = status_mib("VmHWM:") if measured else None
        return out

    steps(args.warmup, timed=False)
    if args.serve:
        # Interleaved with the Rust columns: one line per request, "N" timed steps each.
        print(json.dumps({**header, "ready": True}), flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            result = steps(int(line), timed=True)
            first = losses[0] if losses else None
            last = losses[-1] if losses else None
            print(json.dumps({**header, **result, "first_loss": first, "last_loss": last}), flush=True)
    else:
        result = steps(args.steps, timed=True)
        first = losses[0] if losses else None
        last = losses[-1] if losses else None
        print(json.dumps({**header, **result, "first_loss": first, "last_loss": last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
