import subprocess
import sys


def test_scheduler_side_imports_no_torch():
    """pagoda.core speaks in ids and counts; importing it must not pull in torch."""
    code = ("import sys, pagoda.core.scheduler, pagoda.core.kv_cache_manager, "
            "pagoda.core.outputs, pagoda.core.block_pool; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
