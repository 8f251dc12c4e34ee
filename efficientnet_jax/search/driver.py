"""Many workers, one search: Optuna's RDB storage as the shared store, through ask and tell.

Optuna is an optional dependency (`pip install 'efficientnet-jax[search]'`), imported inside the
functions. Any number of workers (processes, hosts, TPU slices) run `run_worker` against one
storage URL: an SQLite file on one machine, a PostgreSQL or MySQL URL on a cluster. Each
algorithm's search is one Optuna study; each candidate network is one trial.

How a worker takes a candidate, so that none is trained twice and a dead worker's is retried:

1. It fails trials whose heartbeat stopped (`optuna.storages.fail_stale_trials`); Optuna's
   `RetryHeartbeatStaleTrialCallback` puts a copy of each back in the queue (state WAITING,
   same network). Exactly one worker wins that state change, so one copy is queued.
2. If the queue is empty it proposes the next network from the stored history of finished
   trials (`algorithms.py`) and enqueues it; the network is written in the same row that
   creates the trial (`Study.enqueue_trial`).
3. `Study.ask()` pops the oldest waiting trial; the WAITING -> RUNNING change is atomic in the
   database, so one worker gets it.
4. If an earlier live trial (waiting, running or complete) holds the same network, the popped
   one is a duplicate (two workers proposed it at once) and is closed as PRUNED. Trial numbers
   follow creation order (Optuna creates trials under a lock on the study row), so of the
   copies of a network exactly the oldest live one is trained.
5. While training it records a heartbeat every `heartbeat_seconds`; the candidate trains through
   `study.runner` in `workdir/candidates/<network>/`, so a retried candidate resumes from the
   dead worker's last checkpoint. The reward is told to Optuna and written to result.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from efficientnet_jax import configs_lib, errors, preemption
from efficientnet_jax.search import algorithms, objective, space as space_lib
from efficientnet_jax.search.controller import ControllerConfig
from efficientnet_jax.study import runner

__all__ = ['OPTUNA_EXTRA', 'Search', 'build_search', 'default_storage_url', 'finished_trials',
           'open_storage', 'run_worker', 'search_space', 'study_names']

OPTUNA_EXTRA = "pip install 'efficientnet-jax[search]' (or pip install 'optuna>=4.9')"
STORE_FILE = 'search.db'
# Consecutive failed candidates after which a worker stops: something is wrong beyond one network.
MAX_CONSECUTIVE_FAILURES = 3


class SearchStoreError(errors.UserError, ValueError):
  """The store holds a search that this config cannot continue."""


def _optuna():
  try:
    import optuna
  except ImportError:
    raise errors.UserError(f'The baseline search needs Optuna for its shared store: {OPTUNA_EXTRA}.'
                           ) from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
  warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed to be used')
  return optuna


def default_storage_url(workdir: str) -> str:
  """An SQLite file in a local workdir; a gs:// workdir needs a database URL."""
  if '://' in str(workdir):
    raise errors.ConfigError(
        f'--workdir={workdir} is not a local directory, and SQLite needs one. Pass the shared '
        'store with --storage=URL: a PostgreSQL or MySQL URL that every worker can reach (e.g. '
        'postgresql://user:password@host/search), or sqlite:////local/path/search.db.')
  path = os.path.abspath(os.path.join(workdir, STORE_FILE))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return f'sqlite:///{path}'


def open_storage(url: str, heartbeat_seconds: int = 60, grace_seconds: int | None = None,
                 max_retries: int | None = 3):
  """Optuna's RDB storage with heartbeats and the retry of stale trials."""
  optuna = _optuna()
  sqlite = url.startswith('sqlite')
  # Workers on one SQLite file queue for its write lock (waiting up to 120 s, not failing).
  # Python's sqlite3 opens a transaction only at the first write, so Optuna's read-then-write
  # state changes (WAITING -> RUNNING) would not be atomic; with the driver's own transaction
  # handling off, every transaction is BEGIN IMMEDIATE instead (below): one writer at a time.
  engine_kwargs = {'connect_args': {'timeout': 120, 'isolation_level': None}} if sqlite else {}
  import sqlalchemy
  for attempt in range(5):
    try:
      storage = optuna.storages.RDBStorage(
          url, engine_kwargs=engine_kwargs, heartbeat_interval=int(heartbeat_seconds),
          grace_period=int(grace_seconds) if grace_seconds else None,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
              max_retry=max_retries))
      break
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
      # Workers starting together on a new store race to create its tables; the loser sees
      # the winner's rows. Connecting again finds them.
      if attempt == 4:
        raise
      time.sleep(1.0 + attempt)
  if sqlite:
    sqlalchemy.event.listen(storage.engine, 'begin',
                            lambda connection: connection.exec_driver_sql('BEGIN IMMEDIATE'))
  return storage


def search_space(config: ml_collections.ConfigDict) -> space_lib.SearchSpace:
  """The config's slice of the default space (`config.space`)."""
  reference = config.space.reference
  if reference not in space_lib.REFERENCE_TABLES:
    raise errors.ConfigError(f'Unknown config.space.reference {reference!r}; valid: '
                             f'{", ".join(space_lib.REFERENCE_TABLES)}.')
  try:
    return space_lib.default_space().slice(space_lib.REFERENCE_TABLES[reference],
                                           config.space.blocks, config.space.decisions)
  except ValueError as e:
    raise errors.ConfigError(f'config.space: {e}') from None


def make_algorithm(name: str, option_counts: Sequence[int], config: ml_collections.ConfigDict):
  """The algorithm `name` with the config's settings (config.ppo, config.evolution, seed)."""
  if name == 'ppo':
    return algorithms.PPOSearch(option_counts, config.seed, config.ppo.batch_size,
                                ControllerConfig(**{k: v for k, v in config.ppo.items()
                                                    if k != 'batch_size'}))
  if name == 'evolution':
    return algorithms.RegularizedEvolution(option_counts, config.seed,
                                           **config.evolution.to_dict())
  if name == 'random':
    return algorithms.RandomSearch(option_counts, config.seed)
  raise errors.ConfigError(
      f'Unknown algorithm {name!r}; valid: {", ".join(algorithms.ALGORITHMS)}.')


@dataclasses.dataclass
class Search:
  """One algorithm's search: what it searches, how candidates train and score, and the store."""
  name: str  # the Optuna study name
  algorithm: Any  # algorithms.PPOSearch | RegularizedEvolution | RandomSearch
  space: space_lib.SearchSpace
  train_config: ml_collections.ConfigDict  # resolved; every candidate's recipe
  target_madds: float  # T at the search resolution
  target_note: str  # how T was derived, for the reports
  w: float
  form: str
  num_candidates: int
  candidates_dir: str
  storage: Any  # optuna.storages.RDBStorage
  poll_seconds: float = 30.0
  algorithm_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  _keys: dict = dataclasses.field(default_factory=dict, repr=False)

  @functools.cached_property
  def study(self):
    optuna = _optuna()
    study = optuna.create_study(storage=self.storage, study_name=self.name,
                                direction='maximize', load_if_exists=True)
    wanted = self.fingerprint()
    stored = study.user_attrs.get('fingerprint')
    if stored is None:
      study.set_user_attr('fingerprint', wanted)
    elif stored != wanted:
      diffs = [f'{k}: store {stored.get(k)!r}, config {wanted.get(k)!r}'
               for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
      raise SearchStoreError(
          f'The store already holds a search named {self.name!r} with another setup '
          f'({"; ".join(diffs)[:2000]}). Continue it with its own config, or start a new one '
          'with a new --workdir (or --storage).')
    return study

  def fingerprint(self) -> dict[str, Any]:
    """What a stored search must agree with to be continued (the budget may grow)."""
    recipe = json.loads(json.dumps(self.train_config.to_dict(), sort_keys=True, default=str))
    for field in runner.UNCHECKED_FIELDS | {'blocks'}:
      recipe.pop(field, None)
    return {'space': self.space.fingerprint(), 'algorithm': self.algorithm.name,
            'seed': self.algorithm.seed, 'settings': json.dumps(dict(self.algorithm_settings),
                                                                sort_keys=True),
            'target_madds': self.target_madds, 'w': self.w, 'form': self.form,
            'recipe': json.dumps(recipe, sort_keys=True)}

  def key(self, choices: tuple[int, ...]) -> str:
    """The network a choice vector builds under the recipe (`space.network_key`)."""
    if choices not in self._keys:
      self._keys[choices] = space_lib.network_key(
          self.space.decode(choices), self.train_config.width, self.train_config.depth)
    return self._keys[choices]

  def candidate(self, choices: tuple[int, ...]) -> runner.Candidate:
    blocks = tuple(b.encode() for b in self.space.decode(choices))
    return runner.Candidate(space_lib.network_name(self.key(choices)),
                            runner.scaled_config(self.train_config, blocks=blocks))

  def reward(self, top1: float, madds: float) -> float:
    return objective.reward(top1, madds, self.target_madds, self.w, self.form)


def build_search(config: ml_collections.ConfigDict, workdir: str, storage, algorithm: str
                 ) -> Search:
  """The search `config` describes for one algorithm, on `storage` (an RDBStorage)."""
  space = search_space(config)
  train_config = configs_lib.resolve(config.train)
  if train_config.get('blocks') is not None:
    raise errors.ConfigError('config.train.blocks must stay None in a search: the search sets '
                             'each candidate\'s blocks (the space is config.space).')
  if not train_config.model.startswith('efficientnet-'):
    raise errors.ConfigError(f'config.train.model must be an EfficientNet (its block table is '
                             f'what the search replaces); got {train_config.model!r}.')
  if config.objective.form not in objective.FORMS:
    raise errors.ConfigError(f'Unknown config.objective.form {config.objective.form!r}; valid: '
                             f'{", ".join(objective.FORMS)}.')
  target = objective.target_madds(train_config.resolution, train_config.stem_stride,
                                  config.objective.target_madds,
                                  config.objective.target_resolution)
  effective = train_config.resolution * 2 // train_config.stem_stride
  note = (f'{target / 1e6:.4g}M multiply-adds at {train_config.resolution} px: '
          f'{config.objective.target_madds / 1e6:.4g}M at {config.objective.target_resolution} px '
          f'x ({effective}/{config.objective.target_resolution})^2'
          + (' (a stride-1 stem counts the resolution twice)' if train_config.stem_stride == 1
             else ''))
  return Search(
      name=f'{config.study_name}-{algorithm}',
      algorithm=make_algorithm(algorithm, space.option_counts, config),
      space=space, train_config=train_config, target_madds=target, target_note=note,
      w=config.objective.w,
      form=config.objective.form, num_candidates=config.num_candidates,
      candidates_dir=os.path.join(workdir, algorithm, 'candidates'), storage=storage,
      poll_seconds=config.workers.poll_seconds,
      algorithm_settings=config[algorithm].to_dict() if algorithm in config else {})


# --- The store's view ---------------------------------------------------------------------------


def study_names(storage) -> list[str]:
  """The names of the searches (Optuna studies) in `storage`."""
  return _optuna().get_all_study_names(storage)


def finished_trials(study) -> list:
  """The COMPLETE trials in the order they finished (ties: by number)."""
  optuna = _optuna()
  done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  return sorted(done, key=lambda t: (t.datetime_complete, t.number))


def _history(search: Search, trials) -> list[algorithms.Observation]:
  return [algorithms.Observation(search.space.choices_from_params(t.params), float(t.value),
                                 t.user_attrs.get('logp')) for t in trials]


def _live(trial) -> bool:
  """Waiting, running or complete: a trial that holds its network (not failed, not pruned)."""
  return trial.state.name in ('WAITING', 'RUNNING', 'COMPLETE')


def _propose(search: Search, trials) -> None:
  """Proposes the next network from the finished history and puts it in the queue."""
  seen = {t.user_attrs['key'] for t in trials if 'key' in t.user_attrs}
  history = _history(search, sorted((t for t in trials if t.state.name == 'COMPLETE'),
                                    key=lambda t: (t.datetime_complete, t.number)))
  index = len(trials)
  proposal = search.algorithm.propose(history, index, lambda c: search.key(c) not in seen)
  key = search.key(proposal.choices)
  search.study.enqueue_trial(
      search.space.params(proposal.choices),
      user_attrs={'key': key, 'name': space_lib.network_name(key), 'proposal': index,
                  **proposal.attrs})


class _Heartbeat:
  """Records the trial's heartbeat now and then every `interval` seconds, on a thread."""

  def __init__(self, storage, trial_id: int, interval: float):
    self._storage, self._trial_id, self._interval = storage, trial_id, interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.wait(self._interval):
      try:
        self._storage.record_heartbeat(self._trial_id)
      except Exception as e:  # a store hiccup must not kill the training thread
        logging.warning('Heartbeat of trial %d failed: %s', self._trial_id, e)

  def __enter__(self):
    self._storage.record_heartbeat(self._trial_id)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _trial_id(search: Search, trial) -> int:
  study_id = search.storage.get_study_id_from_name(search.name)
  return search.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)


def _take(search: Search):
  """A popped queued trial with its network, or None (a duplicate or an empty queue)."""
  optuna = _optuna()
  trial = search.study.ask()
  if 'key' not in trial.user_attrs:  # another worker emptied the queue first
    trial.set_user_attr('skipped', 'the queue was empty when this trial was created')
    search.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return None
  key = trial.user_attrs['key']
  for dim in search.space.dimensions:  # records the queued network's free decisions
    if len(dim.options) > 1:
      trial.suggest_categorical(dim.name, dim.options)
  earlier = [t for t in search.study.get_trials(deepcopy=False)
             if t.number < trial.number and _live(t) and t.user_attrs.get('key') == key]
  if earlier:
    trial.set_user_attr('duplicate_of', earlier[0].number)
    search.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    logging.info('Trial %d: network %s is trial %d\'s already; skipped.', trial.number,
                 trial.user_attrs['name'], earlier[0].number)
    return None
  return trial


def _requeue(search: Search, trial) -> None:
  """Fails an interrupted trial and queues its retry at once (what a stale heartbeat does)."""
  optuna = _optuna()
  try:
    search.study.tell(trial, state=optuna.trial.TrialState.FAIL)
  except Exception:  # already failed as stale by another worker, which queued the retry
    return
  frozen = search.storage.get_trial(_trial_id(search, trial))
  optuna.storages.RetryHeartbeatStaleTrialCallback()(search.study, frozen)


def run_worker(search: Search, *, train_fn: runner.TrainFn | None = None,
               on_trained: Callable[[Mapping[str, Any]], None] | None = None) -> int:
  """Takes, trains and reports candidates until `search.num_candidates` are finished.

  Returns how many candidates this worker finished. A worker whose remaining candidates are all
  running elsewhere waits (polling every `search.poll_seconds`), so that a candidate whose
  worker dies is retried before the search ends.
  """
  optuna = _optuna()
  finished, failures = 0, 0
  worker = f'{socket.gethostname()}:{os.getpid()}'
  study = search.study
  while True:
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    complete, running, waiting = (states.count(s) for s in ('COMPLETE', 'RUNNING', 'WAITING'))
    if complete >= search.num_candidates:
      logging.info('%s: %d of %d candidates finished; this worker finished %d.', search.name,
                   complete, search.num_candidates, finished)
      return finished
    if not waiting:
      if complete + running >= search.num_candidates:
        logging.info('%s: the last %d candidates are running on other workers; waiting.',
                     search.name, running)
        time.sleep(search.poll_seconds)
        continue
      _propose(search, trials)
    trial = _take(search)
    if trial is None:
      continue
    trial.set_user_attr('worker', worker)
    choices = search.space.choices_from_params(trial.params)
    candidate = search.candidate(choices)
    logging.info('%s: trial %d trains %s (%d of %d finished): %s', search.name, trial.number,
                 candidate.name, complete, search.num_candidates,
                 ' '.join(candidate.config.blocks))
    try:
      with _Heartbeat(search.storage, _trial_id(search, trial),
                      search.storage.get_heartbeat_interval()):
        row = runner.run_candidate(
            candidate, search.candidates_dir, train_fn=train_fn,
            extra=lambda r: {'reward': search.reward(r['top1'], r['madds']),
                             'target_madds': search.target_madds})
    except errors.UserError:
      _requeue(search, trial)
      raise
    except (KeyboardInterrupt, SystemExit, preemption.Preempted):
      # A preemption notice (SIGTERM) saved the candidate's checkpoint: this worker stops, and
      # the retry resumes that checkpoint (here or on another worker). Not a failed network.
      _requeue(search, trial)
      raise
    except Exception as e:  # this network failed (diverged, ran out of memory, ...)
      failures += 1
      logging.exception('%s: trial %d (%s) failed.', search.name, trial.number, candidate.name)
      trial.set_user_attr('error', f'{type(e).__name__}: {e}'[:2000])
      study.tell(trial, state=optuna.trial.TrialState.FAIL)
      if failures >= MAX_CONSECUTIVE_FAILURES:
        raise
      continue
    failures = 0
    for field in ('top1', 'madds', 'params', 'train_seconds', 'cached'):
      if row.get(field) is not None:
        trial.set_user_attr(field, row[field])
    try:
      study.tell(trial, row['reward'])
    except Exception as e:  # presumed dead and failed by another worker meanwhile
      logging.warning('%s: trial %d could not be told (%s); its result.json stands and its '
                      'retry reads it back.', search.name, trial.number, e)
      continue
    finished += 1
    if on_trained is not None:
      on_trained(row)
    logging.info('%s: trial %d: top-1 %.4f, %.4gM multiply-adds, reward %.4f.', search.name,
                 trial.number, row['top1'], row['madds'] / 1e6, row['reward'])
