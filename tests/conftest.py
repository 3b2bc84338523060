"""Test-wide settings: a fixed, small torch thread count (2 cores; oversubscription costs 10x)."""

import os

from flexmoe.runtime import configure_threads

configure_threads(int(os.environ.get("FLEXMOE_THREADS", "2")))
