"""What chapter 5 measures, one module per application.

- :mod:`medit_lite.applications.privacy`: memorisation, the extraction attack, canaries
  and their exposure (Carlini et al., 2019; Nasr et al., 2023), used by DEPN.
- :mod:`medit_lite.applications.bias`: gender bias as DAMA measures it, and perplexity.
- :mod:`medit_lite.applications.toxicity`: toxicity of generations.

Import from the submodules (``from medit_lite.applications.privacy import exposure``);
this package imports none of them, so each loads only what it needs.
"""
