"""Head function (W4 step 3, W5): detectors, OV/QK circuits on the embeddings, composition
scores and attention patterns. Grouped-query attention is handled explicitly: every result
says whether it is per query head or per KV head."""
