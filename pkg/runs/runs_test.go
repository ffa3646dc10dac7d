package runs

import (
	"cmp"
	"fmt"
	"testing"
)

// TestPair: runs come in order, paired by what they compare on, each list
// whole; a list out of order stops the walk and is reported.
func TestPair(t *testing.T) {
	type el struct{ key, id int }
	byKey := func(x, y el) int { return cmp.Compare(x.key, y.key) }
	for _, tc := range []struct {
		name   string
		a, b   []el
		want   string
		sorted bool
	}{
		{"both empty", nil, nil, "", true},
		{"one empty", []el{{1, 0}, {1, 1}, {2, 2}}, nil, "[{1 0} {1 1}]/[] [{2 2}]/[] ", true},
		{"interleaved", []el{{1, 0}, {3, 1}}, []el{{2, 9}, {3, 8}, {3, 7}}, "[{1 0}]/[] []/[{2 9}] [{3 1}]/[{3 8} {3 7}] ", true},
		{"a out of order", []el{{2, 0}, {1, 1}}, []el{{2, 9}}, "[{2 0}]/[{2 9}] ", false},
		{"b out of order", []el{{5, 0}}, []el{{1, 9}, {3, 8}, {2, 7}}, "[]/[{1 9}] []/[{3 8}] ", false},
	} {
		got := ""
		sorted := Pair(tc.a, tc.b, byKey, func(a, b []el) { got += fmt.Sprintf("%v/%v ", a, b) })
		if got != tc.want || sorted != tc.sorted {
			t.Errorf("%s: %q sorted %v, want %q sorted %v", tc.name, got, sorted, tc.want, tc.sorted)
		}
	}
}
