// Package runs walks two sorted lists side by side, a run of equal
// elements at a time: how the applier finds the tables and the rules that
// differ between two plans, and the planner the slots that moved between
// two layouts of the dispatch, without a map of either list.
package runs

// Pair calls f, in order, with each run of elements of a and b that
// compare equal to one another (either run may be empty). a and b must be
// sorted by compare; Pair reports false, and stops, when it finds one of
// them is not.
func Pair[T any](a, b []T, compare func(x, y T) int, f func(a, b []T)) (sorted bool) {
	for len(a) > 0 || len(b) > 0 {
		var at T
		switch {
		case len(a) == 0:
			at = b[0]
		case len(b) == 0 || compare(a[0], b[0]) < 0:
			at = a[0]
		default:
			at = b[0]
		}
		i, j := run(a, at, compare), run(b, at, compare)
		f(a[:i], b[:j])
		a, b = a[i:], b[j:]
		// What follows a run must come after it.
		if len(a) > 0 && compare(a[0], at) < 0 || len(b) > 0 && compare(b[0], at) < 0 {
			return false
		}
	}
	return true
}

// run is how many elements at the start of s compare equal to at.
func run[T any](s []T, at T, compare func(x, y T) int) int {
	n := 0
	for n < len(s) && compare(s[n], at) == 0 {
		n++
	}
	return n
}
