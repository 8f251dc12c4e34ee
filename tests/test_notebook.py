"""notebooks/quickstart.ipynb runs top to bottom (nbclient, CPU) and shows what it promises.

The notebook's own knobs shorten it: EFFICIENTNET_JAX_NOTEBOOK_STEPS fine-tunes for a few steps
instead of the full config, EFFICIENTNET_JAX_LITE0_DIR reuses the session's converted Lite0
weights, and EFFICIENTNET_JAX_NOTEBOOK_WORK keeps its files in the test's temporary directory.
The kernel runs on one real CPU device (the environment of tests/support.subprocess_env), as a
user's would.
"""
from __future__ import annotations

import pytest

from pretrained_fixtures import lite0_dir  # noqa: F401  (a pytest fixture)
from support import ROOT, subprocess_env

NOTEBOOK = ROOT / 'notebooks' / 'quickstart.ipynb'
STEPS = 2


def _text_outputs(cell) -> str:
  parts = []
  for output in cell.get('outputs', []):
    if output.get('output_type') == 'stream':
      parts.append(output.get('text', ''))
    elif 'data' in output:
      parts.append(output['data'].get('text/plain', ''))
  return ''.join(parts)


@pytest.mark.slow
def test_notebook_runs(lite0_dir, tmp_path, monkeypatch):  # noqa: F811
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  for key, value in subprocess_env().items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv('EFFICIENTNET_JAX_NOTEBOOK_STEPS', str(STEPS))
  monkeypatch.setenv('EFFICIENTNET_JAX_NOTEBOOK_WORK', str(tmp_path / 'work'))
  monkeypatch.setenv('EFFICIENTNET_JAX_LITE0_DIR', lite0_dir)

  notebook = nbformat.read(str(NOTEBOOK), as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError, with the failing cell's traceback, on an error

  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  text = '\n'.join(_text_outputs(cell) for cell in code)
  assert 'efficientnet-b0: 5,288,548 parameters' in text
  assert "'model': 'efficientnet-lite0'" in text
  assert 'espresso' in text
  assert f'test top-1 after {STEPS} steps:' in text
  # The two figures (the photos with their top-5, the training curves) were drawn.
  images = [output for cell in code for output in cell.get('outputs', [])
            if 'image/png' in output.get('data', {})]
  assert len(images) == 2
