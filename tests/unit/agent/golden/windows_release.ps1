#Requires -RunAsAdministrator
$ErrorActionPreference = 'Stop'
$Group = 'HostIso Isolation'
$SavedProfiles = "$env:ProgramData\HostIso\firewall-profiles.xml"
Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule
Get-ScheduledTask -TaskPath '\HostIso\' -ErrorAction SilentlyContinue | Unregister-ScheduledTask -Confirm:$false
if (Test-Path $SavedProfiles) {
    foreach ($p in Import-Clixml $SavedProfiles) {
        Set-NetFirewallProfile -Name $p.Name -DefaultInboundAction $p.DefaultInboundAction -DefaultOutboundAction $p.DefaultOutboundAction -AllowInboundRules $p.AllowInboundRules
    }
    Remove-Item $SavedProfiles
}
