"""A setting added to the config after a run was saved: absent from that run's config.yaml, it
is no change while it keeps its default (the run was made with the behaviour the default stands
for), so a finished grid cell is still skipped and a run still resumes; set to anything else it
is a change like any other."""

from __future__ import annotations

from pathlib import Path

import yaml

from asymlora.fedconfig import load_config, save_config
from asymlora.runfolder import CONFIG_FILE, config_changes


def saved_without(folder: Path, section: str, key: str, **overrides: object) -> None:
    """A config.yaml in ``folder`` as a version without ``section.key`` would have saved it."""
    folder.mkdir()
    save_config(
        load_config(overrides=[((section, k), v) for k, v in overrides.items()]), folder / CONFIG_FILE
    )
    data = yaml.safe_load((folder / CONFIG_FILE).read_text())
    del data[section][key]
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_setting_added_since_the_run_is_no_change_at_its_default(tmp_path: Path) -> None:
    saved_without(tmp_path / "run", "federation", "dp_delta")
    at_default = load_config(overrides=[(("output_dir",), str(tmp_path / "run"))])
    assert config_changes(at_default, save_config) == {}
    other = load_config(
        overrides=[(("output_dir",), str(tmp_path / "run")), (("federation", "dp_delta"), 1e-6)]
    )
    assert config_changes(other, save_config) == {"federation.dp_delta": (None, 1e-6)}


def test_a_saved_setting_that_differs_is_still_a_change(tmp_path: Path) -> None:
    saved_without(tmp_path / "run", "federation", "dp_delta", rounds=2)
    cfg = load_config(overrides=[(("output_dir",), str(tmp_path / "run"))])  # rounds: 3 (default)
    assert config_changes(cfg, save_config) == {"federation.rounds": (2, 3)}
