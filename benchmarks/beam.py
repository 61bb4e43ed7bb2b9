"""Both Beam steps against today's single-process ones: files/s, CPU and peak RSS per process.

    .venv/bin/python benchmarks/beam.py --num_files=2000,10000 --work_dir=/tmp/beam_bench \
        --model=/work/main/runs/same_site/nih_pneumonia

For each N it writes benchmarks/labelled_build.py's generated folder (--side, 64 x 64 by default;
--num_files, --work_dir and --side are that script's flags; half 12-bit DICOM
with the patient id in the header, half PNG with it in the CSV, 3 sites, 3 images per patient)
and runs, each as a child process measured from outside:
- build: `python -m covidlib_tfds.build --labels_csv=... --name=bench` (streaming, today's), then
  the same with `--beam_pipeline_options=runner=DirectRunner,direct_running_mode=
  multi_processing,direct_num_workers=W` for each W of --workers; every Beam build's examples
  are compared with the streaming build's (sha256 of each record serialized deterministically,
  per split) and counted against N: no file lost, none changed.
- scoring (--model, copied first: model.keras, config.json, decision.json, shift.*): the N files
  by `covidlib-predict --format=csv` (today's), then `covidlib-predict-beam` with W workers; the
  rows are compared with covidlib-predict's (probability and shift score within 1e-5, relative
  or absolute, the rest equal) and rows + error rows counted against N.

Measured per run: wall time, CPU time (user + system of the process and every child it reaped,
from wait4; and, sampled from /proc, the launcher's own and the Beam workers' together), the
1-minute load average before and after (the machine is shared), and peak RSS
(VmHWM, read from /proc every 0.2 s) of the launching process and of each Beam worker process
(the SDK harness subprocesses), the largest worker shown. Writes benchmarks/results/beam.md and
beam.json (beam_build.* or beam_score.* with --steps=build or --steps=score).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labelled_build  # noqa: E402  The generated folder of issue 11's benchmark.

# --num_files, --work_dir and --side are labelled_build's flags (absl allows one per name).
_NUM_FILES, _WORK_DIR, _SIDE = labelled_build._NUM_FILES, labelled_build._WORK_DIR, \
    labelled_build._SIDE
_WORKERS = flags.DEFINE_list('workers', ['1', '2'], 'Beam DirectRunner worker processes.')
_MODEL = flags.DEFINE_string('model', None, 'A model_dir to score with (copied); none: no '
                             'scoring runs.')
_SCORE_SIZES = flags.DEFINE_list('score_sizes', None, 'Sizes to score (default: all).')
_STEPS = flags.DEFINE_list('steps', ['build', 'score'], 'build, score.')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = os.path.join(_REPO, 'benchmarks', 'results')
_BIN = os.path.dirname(sys.executable)


def _beam_flag(workers: int) -> str:
  return ('--beam_pipeline_options=runner=DirectRunner,direct_running_mode=multi_processing,'
          f'direct_num_workers={workers},default_sdk_harness_log_level=ERROR')


def _children(pid: int) -> list[int]:
  found, frontier = [], [pid]
  parents = {}
  for stat in glob.glob('/proc/[0-9]*/stat'):
    try:
      with open(stat) as f:
        fields = f.read().rsplit(')', 1)[1].split()
      parents.setdefault(int(fields[1]), []).append(int(stat.split('/')[2]))
    except (OSError, IndexError, ValueError):
      pass
  while frontier:
    kids = parents.get(frontier.pop(), [])
    found += kids
    frontier += kids
  return found


_TICKS = os.sysconf('SC_CLK_TCK')


def _cpu_s(pid: int) -> float | None:
  """User + system CPU seconds of a process so far (its own, not its children's)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS
  except (OSError, IndexError, ValueError):
    return None


def _peak_kib(pid: int) -> int | None:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def _is_worker(pid: int) -> bool:
  """A Beam SDK harness process (not the `sh -c` that Beam starts it through)."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      argv = f.read().split(b'\0')
  except OSError:
    return False
  return any(b'sdk_worker_main' in a for a in argv) and not argv[0].endswith(b'sh')


def run_measured(command: list[str], log: str, stdout: str | None = None) -> dict:
  """Runs `command`; wall, CPU, load averages and peak RSS (MiB) of the launcher and workers."""
  env = dict(os.environ, COVIDLIB_SALT='benchmark-salt-not-secret', TF_CPP_MIN_LOG_LEVEL='2',
             CUDA_VISIBLE_DEVICES='')
  load_before = os.getloadavg()[0]
  peaks: dict[int, int] = {}
  cpu: dict[int, float] = {}
  workers: set[int] = set()
  done = threading.Event()
  start = time.perf_counter()
  with open(log, 'w') as err, open(stdout or os.devnull, 'w') as out:
    child = subprocess.Popen(command, cwd=_REPO, env=env, stdout=out if stdout else err,
                             stderr=err)

    def sample():
      while not done.is_set():
        for pid in [child.pid] + _children(child.pid):
          peak, used = _peak_kib(pid), _cpu_s(pid)
          if used is not None:
            cpu[pid] = max(cpu.get(pid, 0.0), used)
          if peak is not None:
            peaks[pid] = max(peaks.get(pid, 0), peak)
            if pid not in workers and _is_worker(pid):
              workers.add(pid)
        time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
  wall = time.perf_counter() - start
  worker_peaks = [peaks[p] / 1024 for p in workers]
  return {'status': os.waitstatus_to_exitcode(status), 'wall_s': wall,
          'cpu_s': usage.ru_utime + usage.ru_stime, 'launcher_rss_mib': peaks.get(child.pid, 0)
          / 1024, 'workers': len(workers), 'worker_rss_mib': max(worker_peaks, default=0.0),
          # Sampled every 0.2 s: up to 0.2 s of each process's last CPU is not seen.
          'launcher_cpu_s': cpu.get(child.pid, 0.0),
          'workers_cpu_s': sum(cpu.get(p, 0.0) for p in workers),
          'load_before': load_before, 'load_after': os.getloadavg()[0]}


def _digests(data_dir: str) -> dict[str, list[str]]:
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(data_dir, 'labelled_xrays', 'bench', '*',
                                     '*.tfrecord-*')):
    split = os.path.basename(path).split('-')[1].split('.')[0]
    out.setdefault(split, []).extend(
        hashlib.sha256(tf.train.Example.FromString(r.numpy()).SerializeToString(
            deterministic=True)).hexdigest() for r in tf.data.TFRecordDataset(path))
  return {k: sorted(v) for k, v in out.items()}


def _row(step: str, n: int, how: str, m: dict, check: str) -> dict:
  return {'step': step, 'files': n, 'how': how, **m, 'files_per_s': n / m['wall_s'],
          'check': check}


def bench_build(root: str, n: int, work: str) -> list[dict]:
  rows = []
  base = [sys.executable, '-m', 'covidlib_tfds.build', f'--labels_csv={root}/labels.csv',
          '--name=bench']
  streaming_dir = os.path.join(work, f'tfds_{n}_streaming')
  m = run_measured(base + [f'--data_dir={streaming_dir}'], os.path.join(work, f'build_{n}.log'))
  if m['status'] != 0:
    raise SystemExit(f'streaming build of {n} failed; see {work}/build_{n}.log')
  expected = _digests(streaming_dir)
  count = sum(map(len, expected.values()))
  rows.append(_row('build', n, 'streaming (today)', m, f'{count} examples'))
  print(rows[-1], flush=True)
  for w in map(int, _WORKERS.value):
    data_dir = os.path.join(work, f'tfds_{n}_beam{w}')
    log = os.path.join(work, f'build_{n}_beam{w}.log')
    m = run_measured(base + [f'--data_dir={data_dir}', _beam_flag(w)], log)
    if m['status'] != 0:
      raise SystemExit(f'Beam build of {n} with {w} workers failed; see {log}')
    same = _digests(data_dir) == expected
    rows.append(_row('build', n, f'Beam, DirectRunner, {w} worker(s)', m,
                     f'{count} examples, {"identical" if same else "DIFFERENT"}'))
    print(rows[-1], flush=True)
    if not same or count != n:
      raise SystemExit(f'Beam build of {n} with {w} workers: not the streaming dataset')
    shutil.rmtree(data_dir)
  shutil.rmtree(streaming_dir)
  return rows


def _read_csv(paths: list[str]) -> dict[str, dict]:
  rows = {}
  for path in paths:
    with open(path, encoding='utf-8') as f:
      rows.update({r['path']: r for r in csv.DictReader(f)})
  return rows


def _same_rows(got: dict, want: dict) -> bool:
  """Equal rows; the two numbers within 1e-5 (relative or absolute): TensorFlow's CPU kernels
  sum in an order that depends on the batch, and the batches differ."""
  if set(got) != set(want):
    return False
  for path, row in want.items():
    other = dict(got[path])
    for key in ('probability', 'shift_score'):
      a, b = row.get(key, ''), other.pop(key, '')
      if (a == '') != (b == '') or (a and not math.isclose(float(a), float(b), rel_tol=1e-5,
                                                           abs_tol=1e-5)):
        return False
    if {k: v for k, v in row.items() if k not in ('probability', 'shift_score')} != other:
      return False
  return True


def bench_score(root: str, n: int, work: str, model: str) -> list[dict]:
  rows = []
  inputs = [os.path.join(root, site) for site in labelled_build._SITES]
  reference = os.path.join(work, f'predict_{n}.csv')
  m = run_measured([os.path.join(_BIN, 'covidlib-predict'), f'--model={model}', '--format=csv']
                   + inputs, os.path.join(work, f'predict_{n}.log'), stdout=reference)
  want = _read_csv([reference])
  if m['status'] != 0 or len(want) != n:
    raise SystemExit(f'covidlib-predict on {n} files: status {m["status"]}, {len(want)} rows')
  rows.append(_row('score', n, 'covidlib-predict (today)', m, f'{n} rows'))
  print(rows[-1], flush=True)
  for w in map(int, _WORKERS.value):
    output = os.path.join(work, f'scores_{n}_beam{w}', 'run')
    log = os.path.join(work, f'predict_{n}_beam{w}.log')
    m = run_measured([os.path.join(_BIN, 'covidlib-predict-beam'), f'--model={model}',
                      f'--output={output}', _beam_flag(w)] + inputs, log)
    got = _read_csv(sorted(glob.glob(f'{output}-*-of-*.csv')))
    same = _same_rows(got, want)
    errors_ = sum(1 for r in got.values() if r['error'])
    rows.append(_row('score', n, f'covidlib-predict-beam, DirectRunner, {w} worker(s)', m,
                     f'{len(got) - errors_} rows + {errors_} error rows, '
                     f'{"identical" if same else "DIFFERENT"}'))
    print(rows[-1], flush=True)
    if m['status'] != 0 or not same:
      raise SystemExit(f'covidlib-predict-beam on {n} files with {w} workers: see {log}')
    shutil.rmtree(os.path.dirname(output))
  return rows


def _table(rows: list[dict]) -> str:
  lines = ['| step | files | how | files/s | wall | CPU: all (launcher + workers) '
           '| peak RSS launcher | peak RSS per worker (processes) | load avg before / after '
           '| check |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    worker = f'{r["worker_rss_mib"]:.0f} MiB ({r["workers"]})' if r['workers'] else '-'
    split = (f' ({r["launcher_cpu_s"]:.0f} + {r["workers_cpu_s"]:.0f})' if r['workers']
             else '')
    lines.append(f'| {r["step"]} | {r["files"]:,} | {r["how"]} | {r["files_per_s"]:.0f} | '
                 f'{r["wall_s"]:.0f} s | {r["cpu_s"]:.0f} s{split} | '
                 f'{r["launcher_rss_mib"]:.0f} MiB | {worker} | {r["load_before"]:.1f} / '
                 f'{r["load_after"]:.1f} | {r["check"]} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  work = _WORK_DIR.value
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  model = None
  if _MODEL.value and 'score' in _STEPS.value:
    model = os.path.join(work, 'model')
    os.makedirs(model)
    for name in ('model.keras', 'config.json', 'decision.json', 'shift.npz', 'shift.json'):
      if os.path.exists(os.path.join(_MODEL.value, name)):
        shutil.copy(os.path.join(_MODEL.value, name), model)
  rows = []
  score_sizes = set(map(int, _SCORE_SIZES.value or _NUM_FILES.value))
  for n in map(int, _NUM_FILES.value):
    root = os.path.join(work, f'export_{n}')
    labelled_build.write_folder(root, n, _SIDE.value)
    if 'build' in _STEPS.value:
      rows += bench_build(root, n, work)
    if model and n in score_sizes:
      rows += bench_score(root, n, work, model)
  os.makedirs(_RESULTS, exist_ok=True)
  name = 'beam' + ''.join(f'_{s}' for s in _STEPS.value if len(_STEPS.value) == 1)
  with open(os.path.join(_RESULTS, f'{name}.json'), 'w') as f:
    json.dump({'command': ' '.join(sys.argv), 'rows': rows}, f, indent=2)
  text = (f'`{" ".join(sys.argv)}`, {time.strftime("%Y-%m-%d")}, {os.cpu_count()} cores\n\n'
          + _table(rows))
  with open(os.path.join(_RESULTS, f'{name}.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  app.run(main)
