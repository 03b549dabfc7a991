"""``pagoda router``: one endpoint in front of replicas, or of prefill and decode instances
(docs/routing.md, docs/disaggregated_prefill.md).

- ``app.py``: the router itself (its HTTP app, instances and health, PROMPT / INSTANCE /
  LOCAL routes from ``entrypoints/routes.py``, disaggregated prefill, ``main``);
- ``policy.py``: the cache-aware policy (expected cached blocks against load);
- ``prefix_index.py``: what each instance holds, approximate (from the text routed) or
  precise (from its KV events);
- ``kv_events.py``: the KV event subscriber that feeds the precise index;
- ``tokenizer.py``: the router's own tokenizer, trusted once it agrees with the instances'.
"""
