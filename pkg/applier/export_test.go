package applier

// DisableNexthopObjects makes a behave as on a kernel without nexthop
// objects: routes name their gateways (the fallback path).
func (a *Applier) DisableNexthopObjects() { a.nexthopsOff.Store(true) }

// NexthopObjectsOff says whether a writes routes that name their gateways.
func (a *Applier) NexthopObjectsOff() bool { return a.nexthopsOff.Load() }
