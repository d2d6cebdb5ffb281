"""The PyTorch side of experiments/bench.py: the same WRN train step, and one convolution's fwd + bwd.

torch is optional (the 'bench' extra: pip install -e ".[bench]"); both functions return (None, reason) without it.
"""

from __future__ import annotations


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, f"torch not installed ({e}); pip install torch==2.13.0 (the 'bench' extra)"
  return torch, None


def make_torch_step(depth: int, widen: int, batch_size: int):
  """Returns (step fn, info) for the PyTorch WRN train step, or (None, reason)."""
  torch, reason = _torch()
  if torch is None:
    return None, reason
  from torch import nn  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"

  class RMSNorm2d(nn.Module):
    """RMSNorm over channels: on a channels_last tensor the NHWC view is contiguous."""

    def __init__(self, c):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
      y = nn.functional.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, 1e-6)
      return y.permute(0, 3, 1, 2)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.norm1, self.norm2 = RMSNorm2d(cin), RMSNorm2d(cout)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x):
      a1 = torch.relu(self.norm1(x))
      h = self.conv2(torch.relu(self.norm2(self.conv1(a1))))
      return h + (self.shortcut(a1) if self.shortcut is not None else x)

  n, layers, cin = (depth - 4) // 6, [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
  for g, stride in enumerate((1, 2, 2)):
    for b in range(n):
      layers.append(Block(cin, 16 * widen * 2**g, stride if b == 0 else 1))
      cin = 16 * widen * 2**g
  layers += [RMSNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
  model = nn.Sequential(*layers).to(device, memory_format=torch.channels_last)
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD(
    [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
    lr=0.1,
    momentum=0.9,
    nesterov=True,
  )
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(device, memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    loss.item()  # waits for the step (also on a GPU)

  info = {
    "version": torch.__version__,
    "device": device,
    "threads": torch.get_num_threads(),
    "params": sum(p.numel() for p in model.parameters()),
  }
  return step, info


def make_conv_step(x, w, g):
  """fwd + bwd (input and kernel gradients) of a stride-1 SAME conv; NHWC x / HWIO w / NHWC g numpy arrays."""
  torch, reason = _torch()
  if torch is None:
    return None, reason
  device = "cuda" if torch.cuda.is_available() else "cpu"
  nchw = lambda a: torch.tensor(a).permute(0, 3, 1, 2).to(device, memory_format=torch.channels_last)  # noqa: E731
  xt, gt = nchw(x).requires_grad_(), nchw(g)
  wt = torch.tensor(w).permute(3, 2, 0, 1).contiguous().to(device).requires_grad_()

  def step():
    xt.grad = wt.grad = None
    torch.nn.functional.conv2d(xt, wt, padding=w.shape[0] // 2).backward(gt)
    wt.grad.sum().item()  # waits (also on a GPU)

  return step, {"version": torch.__version__, "device": device, "threads": torch.get_num_threads()}


def one_thread(step):
  """`step` run with torch limited to one thread (restored afterwards)."""
  import torch  # pylint: disable=import-outside-toplevel

  def run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
      step()
    finally:
      torch.set_num_threads(threads)

  return run
