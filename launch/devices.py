"""Re-export of `detoxrl.train.devices`, where the device rule lives (launch depends on train, never the reverse).

Kept so that `from detoxrl.launch.devices import ...` keeps working; new code imports detoxrl.train.devices.
"""

from detoxrl.train.devices import DEVICE_RE, check_device_name, gpu_index, place_auxiliary, spare_gpus

__all__ = ["DEVICE_RE", "check_device_name", "gpu_index", "place_auxiliary", "spare_gpus"]
