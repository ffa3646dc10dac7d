// Package routespec parses and validates Route specs with the same rules the
// CRD enforces at admission (manifests/crds), so that the agent and the
// offline tools judge a Route exactly as the API server does, and an object
// that slipped past admission (an older CRD, a direct etcd write) is still
// refused with a clear error instead of reaching the kernel.
package routespec

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/validation/field"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// ParseDestination parses a destination as the API accepts it: a CIDR, in
// canonical form or not, or a bare IP address meaning a host route. The
// result is masked: "1.2.3.4/5" gives 0.0.0.0/5, "192.0.2.7" 192.0.2.7/32.
func ParseDestination(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		prefix, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address or a CIDR", s)
		}
		if prefix.Addr().Is4In6() {
			return netip.Prefix{}, fmt.Errorf("%q is an IPv4-mapped IPv6 prefix; write it as IPv4", s)
		}
		return prefix.Masked(), nil
	}
	addr, err := parseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address or a CIDR", s)
	}
	return netip.PrefixFrom(addr, addr.BitLen()), nil
}

// ParseGateway parses a gateway address and refuses addresses that cannot
// be a next hop on a node's directly connected network.
func ParseGateway(s string) (netip.Addr, error) {
	addr, err := parseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, fmt.Errorf("%q is not an IP address (a gateway is a single address, not a CIDR)", s)
	case addr.IsUnspecified():
		return netip.Addr{}, fmt.Errorf("%q is the unspecified address, not a gateway", s)
	case addr.IsLoopback():
		return netip.Addr{}, fmt.Errorf("%q is a loopback address, not a gateway", s)
	case addr.IsLinkLocalUnicast():
		return netip.Addr{}, fmt.Errorf("%q is link-local: a link-local gateway needs an interface, which a Route does not name", s)
	case !addr.IsGlobalUnicast():
		return netip.Addr{}, fmt.Errorf("%q is a multicast or broadcast address, not a gateway", s)
	}
	return addr, nil
}

// parseAddr accepts what the API server's CEL ip() accepts: no zones, no
// IPv4-mapped IPv6 addresses.
func parseAddr(s string) (netip.Addr, error) {
	addr, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	if addr.Zone() != "" || addr.Is4In6() {
		return netip.Addr{}, fmt.Errorf("%q: zones and IPv4-mapped IPv6 addresses are not allowed", s)
	}
	return addr, nil
}

// Validate checks a Route against every rule of the CRD schema and returns
// the errors with the same field paths the API server uses.
func Validate(route *v1alpha1.Route) field.ErrorList {
	spec := field.NewPath("spec")
	errs := validateDestinations(route.Spec.Destinations, spec.Child("destinations"))
	errs = append(errs, validateGateways(route.Spec.Gateways, spec.Child("gateways"))...)
	errs = append(errs, validateFamilies(route.Spec, spec.Child("gateways"))...)
	if route.Spec.NodeSelector != nil {
		errs = append(errs, validateNodeSelector(route.Spec.NodeSelector, spec.Child("nodeSelector"))...)
	}
	return errs
}

func validateDestinations(destinations []string, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	switch {
	case len(destinations) == 0:
		errs = append(errs, field.Required(path, "at least one destination is required"))
	case len(destinations) > v1alpha1.MaxDestinations:
		errs = append(errs, field.TooMany(path, len(destinations), v1alpha1.MaxDestinations))
	}
	seen := sets.New[string]()
	for i, d := range destinations {
		if seen.Has(d) {
			errs = append(errs, field.Duplicate(path.Index(i), d))
		}
		seen.Insert(d)
		if _, err := ParseDestination(d); err != nil {
			errs = append(errs, field.Invalid(path.Index(i), d, err.Error()))
		}
	}
	return errs
}

func validateGateways(gateways []string, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	switch {
	case len(gateways) == 0:
		errs = append(errs, field.Required(path, "at least one gateway is required"))
	case len(gateways) > v1alpha1.MaxGateways:
		errs = append(errs, field.TooMany(path, len(gateways), v1alpha1.MaxGateways))
	}
	seen := map[netip.Addr]bool{}
	for i, g := range gateways {
		addr, err := ParseGateway(g)
		if err != nil {
			errs = append(errs, field.Invalid(path.Index(i), g, err.Error()))
			continue
		}
		if seen[addr] {
			errs = append(errs, field.Duplicate(path.Index(i), g))
		}
		seen[addr] = true
	}
	return errs
}

// validateFamilies requires every address family to have both destinations
// and gateways: a family with only one of them is a mistake either way.
func validateFamilies(spec v1alpha1.RouteSpec, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	for _, family := range []struct {
		name string
		is6  bool
	}{{"IPv4", false}, {"IPv6", true}} {
		hasDestination := containsFamily(spec.Destinations, family.is6)
		hasGateway := containsFamily(spec.Gateways, family.is6)
		switch {
		case hasDestination && !hasGateway:
			errs = append(errs, field.Invalid(path, spec.Gateways, family.name+" destinations need at least one "+family.name+" gateway"))
		case hasGateway && !hasDestination:
			errs = append(errs, field.Invalid(path, spec.Gateways, family.name+" gateways have no "+family.name+" destination to serve"))
		}
	}
	return errs
}

// containsFamily mirrors the CRD's CEL test: with IPv4-mapped addresses
// refused, an address or CIDR is IPv6 exactly when it contains a colon.
func containsFamily(values []string, ipv6 bool) bool {
	for _, v := range values {
		if strings.Contains(v, ":") == ipv6 {
			return true
		}
	}
	return false
}

var labelKey = regexp.MustCompile(`^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$`)

// Node selector bounds, as in the CRD.
const (
	maxSelectorItems    = 16 // terms, and requirements per term
	maxSelectorValues   = 64
	maxLabelValueLength = 63
)

var integer = regexp.MustCompile(`^-?[0-9]{1,18}$`)

func validateNodeSelector(selector *corev1.NodeSelector, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	terms := path.Child("nodeSelectorTerms")
	switch {
	case len(selector.NodeSelectorTerms) == 0:
		errs = append(errs, field.Required(terms, "at least one term is required"))
	case len(selector.NodeSelectorTerms) > maxSelectorItems:
		errs = append(errs, field.TooMany(terms, len(selector.NodeSelectorTerms), maxSelectorItems))
	}
	for i, term := range selector.NodeSelectorTerms {
		if n := len(term.MatchExpressions); n > maxSelectorItems {
			errs = append(errs, field.TooMany(terms.Index(i).Child("matchExpressions"), n, maxSelectorItems))
		}
		if n := len(term.MatchFields); n > maxSelectorItems {
			errs = append(errs, field.TooMany(terms.Index(i).Child("matchFields"), n, maxSelectorItems))
		}
		for j, req := range term.MatchExpressions {
			errs = append(errs, validateLabelRequirement(req, terms.Index(i).Child("matchExpressions").Index(j))...)
		}
		for j, req := range term.MatchFields {
			errs = append(errs, validateFieldRequirement(req, terms.Index(i).Child("matchFields").Index(j))...)
		}
	}
	return errs
}

func validateLabelRequirement(req corev1.NodeSelectorRequirement, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if !labelKey.MatchString(req.Key) {
		errs = append(errs, field.Invalid(path.Child("key"), req.Key, "not a label key (an optional DNS prefix and \"/\", then a name of at most 63 characters)"))
	}
	values := path.Child("values")
	if len(req.Values) > maxSelectorValues {
		errs = append(errs, field.TooMany(values, len(req.Values), maxSelectorValues))
	}
	for i, v := range req.Values {
		if len(v) > maxLabelValueLength {
			errs = append(errs, field.TooLong(values.Index(i), v, maxLabelValueLength))
		}
	}
	switch req.Operator {
	case corev1.NodeSelectorOpIn, corev1.NodeSelectorOpNotIn:
		if len(req.Values) == 0 {
			errs = append(errs, field.Required(values, "operators In and NotIn need at least one value"))
		}
	case corev1.NodeSelectorOpExists, corev1.NodeSelectorOpDoesNotExist:
		if len(req.Values) > 0 {
			errs = append(errs, field.Forbidden(values, "operators Exists and DoesNotExist take no values"))
		}
	case corev1.NodeSelectorOpGt, corev1.NodeSelectorOpLt:
		if len(req.Values) != 1 || !integer.MatchString(req.Values[0]) {
			errs = append(errs, field.Invalid(values, req.Values, "operators Gt and Lt take exactly one integer value"))
		}
	default:
		errs = append(errs, field.NotSupported(path.Child("operator"), req.Operator, []string{"In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"}))
	}
	return errs
}

func validateFieldRequirement(req corev1.NodeSelectorRequirement, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if req.Key != "metadata.name" {
		errs = append(errs, field.NotSupported(path.Child("key"), req.Key, []string{"metadata.name"}))
	}
	if req.Operator != corev1.NodeSelectorOpIn && req.Operator != corev1.NodeSelectorOpNotIn {
		errs = append(errs, field.NotSupported(path.Child("operator"), req.Operator, []string{"In", "NotIn"}))
	}
	if len(req.Values) != 1 {
		errs = append(errs, field.Invalid(path.Child("values"), req.Values, "a field requirement takes exactly one value"))
	}
	return errs
}
