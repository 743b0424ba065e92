"""Helpers shared by the benchmark scripts: timing, machine load, memory and the JSON record.

Each script prints one JSON line to stdout and its progress to stderr. The scripts import only
the parts of opengan_jax that the measured work needs. They leave out `opengan_jax.train`,
because its TensorBoard writer (clu) imports TensorFlow, which adds about 530 MB of resident
memory (measured with jax 0.10.2 and tensorflow-cpu 2.21).
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from opengan_jax import cpu_backend  # noqa: E402

# Before JAX starts: the benchmarks measure the XLA:CPU options the training job runs with.
cpu_backend.add_xla_cpu_flags()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from opengan_jax import networks  # noqa: E402
from opengan_jax.models import Discriminator, Generator  # noqa: E402

DTYPES = ('float32', 'bfloat16')


def add_common_arguments(parser: argparse.ArgumentParser, default_batch: int) -> None:
  """Add the flags every benchmark takes: batch, steps, warmup, dtype and the matmul size."""
  parser.add_argument('--batch', type=int, default=default_batch, help='global batch size')
  parser.add_argument('--steps', type=int, default=20, help='timed calls')
  parser.add_argument('--warmup', type=int, default=3, help='untimed calls before timing')
  parser.add_argument(
    '--dtype', choices=DTYPES, default='float32', help='computation dtype of the networks'
  )
  parser.add_argument(
    '--matmul_size', type=int, default=2048, help='side of the float32 yardstick matmul'
  )


def log(message: str) -> None:
  """Write a progress line to stderr, keeping stdout for the JSON record."""
  print(message, file=sys.stderr, flush=True)


def busy_cpu_seconds() -> float | None:
  """Return the CPU seconds all cores of the machine spent busy since boot, from /proc/stat.

  Idle and iowait ticks count as not busy. Returns None where /proc/stat cannot be read.
  """
  try:
    with open('/proc/stat') as stat:
      fields = [int(value) for value in stat.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + fields[4]
  return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


class TimedRuns:
  """Wall times of repeated calls and the load other processes put on the machine meanwhile.

  other_load of one call is (machine busy CPU seconds - this process's CPU seconds) divided by
  the call's wall seconds: the number of cores that other processes kept busy. It is about 0 on
  a quiet machine. /proc/stat counts in clock ticks (10 ms), so the load of a call shorter than
  about a second reads coarsely. other_load_mean, over all calls together, is steadier.
  """

  def __init__(self):
    self.times: list[float] = []
    self.other_loads: list[float | None] = []
    self._other_cpu_seconds = 0.0

  def measure(self, call: Callable[[], Any]) -> Any:
    """Run `call` once, record its wall time and the other load, and return its result."""
    busy_start, cpu_start = busy_cpu_seconds(), time.process_time()
    start = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - start
    busy_end, cpu_end = busy_cpu_seconds(), time.process_time()
    load = None
    if busy_start is not None and busy_end is not None:
      other_cpu_seconds = (busy_end - busy_start) - (cpu_end - cpu_start)
      self._other_cpu_seconds += other_cpu_seconds
      load = max(0.0, other_cpu_seconds) / elapsed
    self.times.append(elapsed)
    self.other_loads.append(load)
    return result

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def minimum(self) -> float:
    return min(self.times)

  @property
  def other_load_max(self) -> float | None:
    if not self.other_loads or None in self.other_loads:
      return None
    return round(max(self.other_loads), 2)

  @property
  def other_load_mean(self) -> float | None:
    if not self.other_loads or None in self.other_loads:
      return None
    return round(max(0.0, self._other_cpu_seconds) / sum(self.times), 2)


def run_timed(call: Callable[[int], Any], num_warmup: int, num_steps: int, label: str) -> TimedRuns:
  """Call `call(i)` for num_warmup untimed and then num_steps timed iterations.

  `call` must block until its work is done (jax.block_until_ready), or the times only measure
  the dispatch.
  """
  for i in range(num_warmup):
    start = time.perf_counter()
    call(i)
    log(f'{label} warmup {i}: {time.perf_counter() - start:.3f} s')
  runs = TimedRuns()
  for i in range(num_steps):
    runs.measure(lambda i=i: call(num_warmup + i))
    log(f'{label} step {i}: {runs.times[-1]:.3f} s, other_load={runs.other_loads[-1]}')
  return runs


def peak_rss_mb() -> float:
  """Return the peak resident memory of this process so far in MB (Linux reports KiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def compiled_flops(compiled: Any) -> float | None:
  """Return XLA's FLOP count of one call of a compiled executable, or None if it has none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # Older jax versions return one dict per program.
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float, float | None]:
  """Compile `jitted` for `args`; return the executable, the compile seconds and its FLOPs."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  flops = compiled_flops(compiled)
  log(f'compiled in {compile_s:.1f} s; XLA FLOPs per call {flops}')
  return compiled, compile_s, flops


def throughput_figures(
  runs: TimedRuns, items_per_call: int, flops: float | None, prefix: str = ''
) -> dict[str, Any]:
  """Return items/s, step times, FLOP/s and the other load of timed calls."""
  figures = {
    f'{prefix}img_per_s': items_per_call / runs.median,
    f'{prefix}step_s_median': runs.median,
    f'{prefix}step_s_min': runs.minimum,
    f'{prefix}other_load_max': runs.other_load_max,
    f'{prefix}other_load_mean': runs.other_load_mean,
  }
  if flops is not None:
    figures[f'{prefix}flops_per_s'] = flops / runs.median
  return figures


def add_machine_figures(record: dict[str, Any], matmul_size: int) -> None:
  """Add the matmul yardstick, the step's fraction of it, peak memory and the environment."""
  record.update(matmul_flops_per_s(matmul_size))
  if record.get('flops_per_s') is not None:
    record['fraction_of_matmul'] = record['flops_per_s'] / record['matmul_flops_per_s']
  record['peak_rss_mb'] = peak_rss_mb()
  record.update(environment())


def matmul_flops_per_s(size: int = 2048, repeats: int = 10) -> dict[str, float]:
  """Time a float32 (size x size) matmul on the default device, as a yardstick for the machine.

  Returns the FLOP/s of the median and of the fastest of `repeats` calls (2 * size^3 FLOPs
  each), after one untimed call that compiles.
  """
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  runs = TimedRuns()
  for _ in range(repeats):
    runs.measure(lambda: jax.block_until_ready(matmul(a, b)))
  flops = 2.0 * size**3
  return {
    'matmul_size': size,
    'matmul_flops_per_s': flops / runs.median,
    'matmul_flops_per_s_max': flops / runs.minimum,
    'matmul_other_load_mean': runs.other_load_mean,
  }


def cpu_model() -> str | None:
  """Return the 'model name' of the first CPU in /proc/cpuinfo, or None."""
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


def environment() -> dict[str, Any]:
  """Return the software and hardware facts that go with every record."""
  devices = jax.local_devices()
  return {
    'jax_version': jax.__version__,
    'python_version': platform.python_version(),
    'device_kind': devices[0].device_kind,
    'platform': devices[0].platform,
    'num_devices': len(devices),
    'cpu_model': cpu_model(),
    'nproc': os.cpu_count(),
    'xla_flags': os.environ.get('XLA_FLAGS'),
  }


def model_config(resolution: int, ch: int, batch: int, dtype: str) -> ml_collections.ConfigDict:
  """Return the default config with the benchmark's resolution, ch, batch size and dtype."""
  from configs import default

  config = default.get_config()
  config.resolution = resolution
  config.model.ch = ch
  config.batch_size = batch
  config.model.dtype = dtype
  return config


def make_networks(
  config: ml_collections.ConfigDict, num_classes: int
) -> tuple[Generator, Discriminator, nn.Module]:
  """Build G, D and F in the config's compute dtype, as the training job does."""
  generator, discriminator = networks.make_networks(config, num_classes)
  extractor = networks.make_extractor(config).clone(dtype=networks.compute_dtype(config))
  return generator, discriminator, extractor


def emit(record: dict[str, Any]) -> None:
  """Print `record` as one JSON line on stdout, floats rounded to 4 significant digits."""

  def rounded(value):
    if isinstance(value, float):
      return float(f'{value:.4g}')
    return value

  print(json.dumps({key: rounded(value) for key, value in record.items()}), flush=True)
