"""Protocol frontends: thin adapters from a wire protocol to auth events and the router."""
