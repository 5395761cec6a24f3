"""Integration: the local stack (containerd + registry + BootSeer daemons on loopback), containerd
configuration, test-image builders and benchmarks.  The quickstart, the tests and the benchmarks all
start their world through this package."""
