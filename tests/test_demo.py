"""`make demo`'s scenario, run as users run it: a subprocess that must converge."""

import subprocess
import sys


def test_demo_scenario_converges_and_explains_itself():
    done = subprocess.run([sys.executable, "-m", "meshstore.demo"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "stale=['position']" in out  # the classifier's stale copy did not clobber the sensor
    assert "Converged: yes" in out
    assert "the higher (HIGH)" in out
    assert "Traceback" not in done.stderr
