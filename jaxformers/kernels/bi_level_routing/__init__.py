"""Bi-level routing attention (BiFormer): ``api.bi_level_routing_attention`` is the public function;
``reference.py`` the plain-jnp truth, ``pallas_kernel.py`` the fused Pallas kernels + custom VJP."""
