"""The training tests' shared settings."""

# Runs that do not test sharding train on one of the session's 8 simulated devices (config.mesh.devices=1): the
# tiny programs compile and step faster than sharded over all 8 (2-core VM: test_run.py's fixture 120 -> 98 s;
# test_dreambooth.py beside test_lora_training.py 90 / 102 -> 71 / 86 s). Sharding is test_sharding.py's,
# test_loop.py's and test_checkpoint.py's, processes tests/test_distributed.py's.
ONE_DEVICE = {"mesh.devices": 1}
