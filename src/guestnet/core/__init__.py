"""The sans-I/O core: services and state machines that take frames, time and events and emit
frames and actions. Nothing here touches a socket or reads the clock."""
