"""Direct Preference Optimization of the policy LVLM against a frozen reference (STLLaVA-Med stage 2b)."""
