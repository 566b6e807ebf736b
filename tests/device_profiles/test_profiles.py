"""Built-in and user device profiles, and the live profile of this machine."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from device_profiles import BUILTIN_PROFILES, DeviceProfile, ProfileError, load_profiles, resolve_device
from device_profiles.profile import FIELDS

BUILTIN_NAMES = ("rpi4-4gb", "rpi4-8gb", "rpi5-8gb", "rpi-zero2w", "phone-mid", "phone-flagship",
                 "jetson-orin-nano", "laptop")


def test_builtins_exist_and_say_where_each_number_comes_from():
    assert set(BUILTIN_PROFILES) == set(BUILTIN_NAMES)
    for profile in BUILTIN_PROFILES.values():
        assert set(profile.sources) == {*FIELDS, "baseline_bytes"}
        assert profile.ram_bytes < 16e9 and profile.gflops > 0


def test_resolve_names_a_copy_and_rejects_unknown_profiles():
    pi = resolve_device("rpi5-8gb:kitchen")
    assert pi.name == "kitchen" and pi.gflops == BUILTIN_PROFILES["rpi5-8gb"].gflops
    assert resolve_device("laptop").name == "laptop"
    with pytest.raises(ProfileError, match="unknown device profile 'rpi9'.*--device-file"):
        resolve_device("rpi9:x")


def test_profile_files_in_toml_and_json(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[[device]]\nname = "a"\nram_gb = 2.5\ncores = 4\ngflops = 12\nlink_mbit_s = 80\n'
                    '[device.sources]\ngflops = "measured"\n')
    (a,) = load_profiles(toml)
    assert a == DeviceProfile("a", 2_500_000_000, 4, 12.0, 10e6)
    assert a.sources == {"gflops": "measured"}
    single = tmp_path / "d.json"
    single.write_text(json.dumps(a.to_dict()))
    assert load_profiles(single) == [a]
    assert resolve_device("a:b", {"a": a}).name == "b"
    single.write_text('{"name": "x", "cores": 1}')
    with pytest.raises(ProfileError, match="missing"):
        load_profiles(single)
    with pytest.raises(ProfileError, match="gflops must be > 0"):
        DeviceProfile("x", 1, 1, 0.0, 1.0)


def test_ringtune_profile_json_is_a_device_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ringtune.cli", "profile", "--json", "--seconds", "0.2",
                             "--name", "here"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "here.json"
    path.write_text(result.stdout)
    (profile,) = load_profiles(path)
    assert profile.name == "here" and profile.cores >= 1 and profile.gflops > 0.1
    assert profile.ram_bytes > 0 and "measured" in profile.sources["gflops"]
    # the agent runtime's own memory, measured as an agent measures it (torch, transformers, peft loaded)
    assert 100e6 < profile.baseline_bytes < 2e9 and "measured" in profile.sources["baseline_bytes"]
