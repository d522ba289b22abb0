"""`python -m bench` (make bench): the gateway benchmark. See bench/gateway.py."""

from bench.gateway import main

main()
