"""Online RL: PPO / RLOO / GRPO / Dr. GRPO (``ppo`` with ``config``, ``models``, ``rollout``,
``update``), iterated RLHF rounds (``iterated``) and plots of runs (``plots``).
"""
