import subprocess
import sys


def test_scheduler_side_imports_no_torch_and_no_kv_transfer():
    """pagoda.core speaks in ids and counts: importing it (and the request it schedules, and
    the speculator beside it and its verification rule) must pull in neither torch nor the
    KV connector (kv_transfer/ depends on core/, never the
    reverse)."""
    code = ("import sys, pagoda.core.scheduler, pagoda.core.kv_cache_manager, "
            "pagoda.core.outputs, pagoda.core.block_pool, pagoda.core.remote_kv, "
            "pagoda.core.stats, pagoda.request, pagoda.spec_decode.speculator, "
            "pagoda.worker.spec_verify; "
            "print('torch' in sys.modules, any(m.startswith('pagoda.kv_transfer') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
