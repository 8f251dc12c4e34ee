"""tcmalloc re-execution: when it happens, with what, and that a command really runs under it."""
import os
import subprocess
import sys

from efficientnet_jax import allocator


def _find():
  return '/usr/lib/libtcmalloc_minimal.so.4'


def test_command_preloads_tcmalloc(monkeypatch):
  monkeypatch.setattr(os.path, 'exists', lambda p: True)
  argv, env = allocator.tcmalloc_command({'PATH': '/bin', 'LD_PRELOAD': '/x.so'},
                                         ['python', '-m', 'efficientnet_jax.main'],
                                         platform='linux', find=_find)
  assert argv == ['python', '-m', 'efficientnet_jax.main']
  assert env['LD_PRELOAD'] == '/usr/lib/libtcmalloc_minimal.so.4 /x.so'
  assert env['PATH'] == '/bin'
  # The re-executed process does not do it again.
  assert allocator.tcmalloc_command(env, argv, platform='linux', find=_find) is None


def test_command_skipped_when_off_absent_loaded_or_not_linux(monkeypatch):
  monkeypatch.setattr(os.path, 'exists', lambda p: True)
  argv = ['python', 'x.py']
  assert allocator.tcmalloc_command({allocator.ENV: '0'}, argv, 'linux', _find) is None
  assert allocator.tcmalloc_command({}, argv, 'darwin', _find) is None
  assert allocator.tcmalloc_command({'LD_PRELOAD': '/lib/libtcmalloc.so.4'}, argv, 'linux',
                                    _find) is None
  assert allocator.tcmalloc_command({}, argv, 'linux', lambda: None) is None
  named = allocator.tcmalloc_command({allocator.ENV: '/opt/libtcmalloc.so'}, argv, 'linux', _find)
  assert named[1]['LD_PRELOAD'] == '/opt/libtcmalloc.so'


def test_missing_named_library_goes_on():
  assert allocator.tcmalloc_command({allocator.ENV: '/nonexistent/libtcmalloc.so'}, ['p'],
                                    'linux', _find) is None


def test_a_command_reexecutes_under_tcmalloc_where_installed():
  """End to end where the library is installed (CI installs it); the job's exit is unchanged."""
  library = allocator.find_tcmalloc()
  code = ('import sys; from efficientnet_jax import allocator; allocator.reexec_with_tcmalloc(); '
          'print(open("/proc/self/maps").read().count("tcmalloc") > 0, sys.argv[1:])')
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', allocator.ENV, allocator.MARKER)}
  result = subprocess.run([sys.executable, '-c', code, 'a', '--b=1'], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
  loaded = library is not None
  assert result.stdout.strip() == f"{loaded} ['a', '--b=1']", result.stderr
  assert ('restarting with' in result.stderr) == loaded
  off = subprocess.run([sys.executable, '-c', code], env={**env, allocator.ENV: '0'},
                       capture_output=True, text=True, timeout=120, check=True)
  assert off.stdout.startswith('False')
