//! SWIM membership with the Lifeguard extensions, as a sans-IO state machine.
