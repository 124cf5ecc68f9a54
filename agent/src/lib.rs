//! libumm_agent.so — see agent/README or umm-agent(7).
