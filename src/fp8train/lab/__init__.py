"""The fp8train lab: train small models under each precision and report the differences.

Run it as ``fp8train compare`` (see ``fp8train.lab.cli``). The lab imports the library,
never the reverse.
"""
