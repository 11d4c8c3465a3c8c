"""fedjax_sim."""
