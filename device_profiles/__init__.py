"""Device profiles: RAM, cores, sustained matmul GFLOP/s and link bandwidth of the devices in a ring."""
from device_profiles.builtin import BUILTIN_PROFILES, resolve_device
from device_profiles.profile import DeviceProfile, ProfileError, load_profiles, parse_profiles, profile_from_dict

__all__ = ["BUILTIN_PROFILES", "DeviceProfile", "ProfileError", "load_profiles", "parse_profiles",
           "profile_from_dict", "resolve_device"]
