"""Local + global attention (sliding windows, global tokens, groups, causal / chunk-causal, packed
segments): ``api.local_global_attention`` is the public function."""
