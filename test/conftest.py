import os
import sys

from hypothesis import HealthCheck, settings

# test/opinfo_<family>.py are imported by name from the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Property tests draw the same examples on every run and machine (derandomize):
# a red CI run replays locally, and a green one is not luck of the draw. Each
# test sets max_examples for its parameter space. HYPOTHESIS_PROFILE=explore
# draws fresh random examples (and more of them) when hunting for new bugs.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, max_examples=1000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
